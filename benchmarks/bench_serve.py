"""Load test of ``zuoyou serve`` on loopback: concurrent clients mixing chat and drawing.

    python benchmarks/bench_serve.py                    # the bundled model
    python benchmarks/bench_serve.py --model tiny       # a random tiny checkpoint (no download)
    python benchmarks/bench_serve.py --model PATH --concurrency 16 --duration 60 --json out.json

The server runs in its own process (``python -m zuoyou.server.cli serve``), the clients are threads
here. Three phases, each bounded in time (a request started before the end is let finish):
  1. drawing only, 1 client      -> images/s without merging
  2. drawing only, 8 clients     -> images/s with merging; "batching gain" = 2 / 1
  3. mixed, --concurrency clients, --image-share of requests drawing, the rest chat
Reported: requests/s, p50/p99 latency per kind, errors, the server's peak memory (VmHWM), and the
server's own batching counters (mean requests per decode batch).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

WORDS = ["a photo of a red circle", "a blue square left of a green cross", "How many objects are there?",
         "What color is the circle?", "one two three four zero yes no", "Describe the image."]
PROMPTS = ["a red circle", "a blue square left of a green cross", "two yellow triangles", "a small green circle"]


def tiny_checkpoint(folder: Path) -> Path:
    import torch

    from zuoyou.config import get_config
    from zuoyou.loading import save_model
    from zuoyou.models.janus import build
    from zuoyou.tokenizer import train_tokenizer

    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = build(cfg, "cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_model(model, folder)
    train_tokenizer(WORDS * 20, vocab_size=cfg.lm.vocab_size).save(str(folder / "tokenizer.json"))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sample_image_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Load:
    def __init__(self, url: str, max_tokens: int, n: int):
        self.url, self.max_tokens, self.n = url, max_tokens, n
        self.image_uri = sample_image_uri()

    def one(self, http: httpx.Client, kind: str, rng: random.Random) -> tuple[str, float, bool, int]:
        t0 = time.perf_counter()
        try:
            if kind == "image":
                r = http.post("/v1/images/generations", json={"prompt": rng.choice(PROMPTS), "n": self.n,
                                                              "response_format": "b64_json"})
                ok = r.status_code == 200 and len(r.json()["data"]) == self.n
                units = self.n if ok else 0
            else:
                content = [{"type": "text", "text": rng.choice(WORDS[2:4])}]
                if rng.random() < 0.5:
                    content.insert(0, {"type": "image_url", "image_url": {"url": self.image_uri}})
                r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                            "max_tokens": self.max_tokens, "temperature": 0.7})
                ok = r.status_code == 200
                units = r.json()["usage"]["completion_tokens"] if ok else 0
        except httpx.HTTPError:
            ok, units = False, 0
        return kind, time.perf_counter() - t0, ok, units

    def run(self, clients: int, seconds: float, image_share: float) -> dict:
        results, lock = [], threading.Lock()
        end = time.perf_counter() + seconds

        def client(i):
            rng = random.Random(i)
            with httpx.Client(base_url=self.url, timeout=600) as http:
                while time.perf_counter() < end:
                    kind = "image" if rng.random() < image_share else "chat"
                    res = self.one(http, kind, rng)
                    with lock:
                        results.append(res)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return summarize(results, wall, clients)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def summarize(results, wall, clients) -> dict:
    out = {"clients": clients, "seconds": round(wall, 2), "requests": len(results),
           "errors": sum(1 for r in results if not r[2]),
           "requests_per_s": round(len(results) / wall, 3)}
    for kind in ("image", "chat"):
        lat = [r[1] for r in results if r[0] == kind and r[2]]
        if not lat:
            continue
        units = sum(r[3] for r in results if r[0] == kind)
        out[kind] = {"requests": len(lat), "p50_s": round(pct(lat, 50), 3), "p99_s": round(pct(lat, 99), 3),
                     "mean_s": round(statistics.fmean(lat), 3),
                     ("images_per_s" if kind == "image" else "tokens_per_s"): round(units / wall, 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or hub id; 'tiny' = random tiny model "
                                                  "(default: the bundled model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in the mixed phase (default 8)")
    ap.add_argument("--duration", type=float, default=30, help="seconds of the mixed phase (default 30)")
    ap.add_argument("--gain-seconds", type=float, default=15, help="seconds of each drawing-only phase")
    ap.add_argument("--image-share", type=float, default=0.5, help="fraction of mixed requests that draw")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of chat requests (default 32)")
    ap.add_argument("--n", type=int, default=1, help="images per drawing request (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    model = args.model
    tmp = None
    if model == "tiny":
        tmp = tempfile.TemporaryDirectory()
        model = str(tiny_checkpoint(Path(tmp.name)))
    elif model is None:
        from zuoyou.api import BUNDLED

        if not (BUNDLED / "config.json").is_file():
            print("this install has no bundled model yet: pass --model PATH (or --model tiny)", file=sys.stderr)
            return 2
    port = free_port()
    cmd = [sys.executable, "-m", "zuoyou.server.cli", "serve", "--port", str(port), "--device", args.device,
           "--max-queue", "1024", "--log-level", "warning", "--max-batch-images", str(max(16, 8 * args.n))]
    if model:
        cmd += ["--model", model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if server.poll() is not None or time.time() > deadline:
                print("the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        info = httpx.get(url + "/health").json()
        load = Load(url, args.max_tokens, args.n)
        with httpx.Client(base_url=url, timeout=600) as http:  # warm up both paths
            assert all(load.one(http, kind, random.Random(0))[2] for kind in ("chat", "image")), "warm-up failed"
        res = {"model": info["model"], "image_size": info["image_size"]}
        print(f"model {info['model']} ({info['image_size']}x{info['image_size']}), server pid {server.pid}")
        for name, clients, secs, share in (("draw_c1", 1, args.gain_seconds, 1.0),
                                           ("draw_c8", 8, args.gain_seconds, 1.0),
                                           ("mixed", args.concurrency, args.duration, args.image_share)):
            before = httpx.get(url + "/health").json()["batcher"]
            res[name] = r = load.run(clients, secs, share)
            after = httpx.get(url + "/health").json()["batcher"]
            for kind in ("image", "chat"):
                nb = after[f"{kind}_batches"] - before[f"{kind}_batches"]
                if nb:
                    r.setdefault(kind, {})["requests_per_batch"] = round(
                        (after[f"{kind}_requests"] - before[f"{kind}_requests"]) / nb, 2)
            print(f"{name:8s} {json.dumps(r)}")
        g1, g8 = res["draw_c1"]["image"]["images_per_s"], res["draw_c8"]["image"]["images_per_s"]
        res["batching_gain"] = round(g8 / g1, 2) if g1 else None
        res["server_peak_rss_mb"] = peak_rss_mb(server.pid)
        m = res["mixed"]
        print(f"\nmixed, {m['clients']} clients, {m['seconds']} s: {m['requests_per_s']} req/s, "
              f"{m['errors']} errors")
        for kind in ("image", "chat"):
            if kind in m:
                print(f"  {kind:5s} p50 {m[kind]['p50_s']} s  p99 {m[kind]['p99_s']} s  "
                      f"({m[kind]['requests']} requests, {m[kind].get('requests_per_batch', '?')} per batch)")
        print(f"images/s: {g1} at concurrency 1, {g8} at 8 -> batching gain x{res['batching_gain']}")
        print(f"server peak memory: {res['server_peak_rss_mb']:.0f} MiB" if res["server_peak_rss_mb"] else "")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
