"""Relations from given places: does a curriculum of single-lookup and sign-only questions break the plateau?

A probe, not part of the package (docs/shapes-training-log.md, "Nineteenth session", has its results):

    python docs/probes/relations_curriculum.py "side=1:1000;side=1,sign=2:1500;side=1,sign=1,spec=2:1500" OUT.json --lr 3e-4
    python docs/probes/relations_curriculum.py "spec=1:2600" OUT.json --lr 3e-4      # the control

A fresh LM of the bundled size (zuoyou's LlamaForCausalLM: 6 layers, 256 wide, 4 heads, SwiGLU 704), one input
token per object = a learned (colour, shape) embedding + a linear map of its centre ((cx/64 - .5, cy/64 - .5) * 4),
then a 9-word question; the answer yes / no read at the last position. Question kinds:
  spec  "is the C S REL the C S ?"      the world's relation rule (dx >= 8 and |dx| > |dy| ...), yes/no balanced
  sign  "is the C S MORE the C S ?"      MORE in more-left / more-right / higher / lower: one coordinate, >= 8 px
  side  "is the C S on the SIDE half ?"  one object's own place: cx < 32 (left half), etc.
PHASES: "MIX:STEPS;MIX:STEPS;..." run in turn, MIX the kinds' sampling weights; AdamW (weight decay 0.01), 50 warm-up
steps then a constant learning rate, gradients clipped to norm 1, batches of 64; held-out accuracy of each kind on
1000 questions every 100 steps (printed, and written to OUT.json).
"""
import argparse, json, random, time
import torch, torch.nn as nn, torch.nn.functional as F
from zuoyou.config import LMConfig
from zuoyou.models.llama import LlamaForCausalLM
from zuoyou.shapes.world import COLORS, SHAPES, RELATIONS, sample_scene, relations

torch.set_num_threads(2)
COL, SH = list(COLORS), list(SHAPES)
MORE = ("more-left", "more-right", "higher", "lower")
SIDES = ("left", "right", "top", "bottom")
WORDS = ["is", "the", "?", "on", "half", "yes", "no", *COL, *SH, *RELATIONS, *MORE, *SIDES]
W = {w: i for i, w in enumerate(WORDS)}
YES, NO = W["yes"], W["no"]


def uniq(objs):
    key = lambda o: (o.color, o.shape)
    c = {}
    for o in objs: c[key(o)] = c.get(key(o), 0) + 1
    return [o for o in objs if c[key(o)] == 1]


def more(a, b, r):
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"more-left": dx >= 8, "more-right": -dx >= 8, "higher": dy >= 8, "lower": -dy >= 8}[r]


def side(a, s):
    return {"left": a.cx < 32, "right": a.cx >= 32, "top": a.cy < 32, "bottom": a.cy >= 32}[s]


def example(rng, kind):
    while True:
        objs = list(sample_scene(rng).objects)
        u = uniq(objs)
        if kind == "side" and u:
            a, s = rng.choice(u), rng.choice(SIDES)
            return objs, ["is", "the", a.color, a.shape, "on", "the", s, "half", "?"], side(a, s)
        if kind in ("spec", "sign") and len(u) >= 2:
            pairs = [(a, b) for a in u for b in u if a is not b]
            rels = RELATIONS if kind == "spec" else MORE
            holds = (lambda a, b, r: r in relations(a, b)) if kind == "spec" else more
            want = rng.random() < 0.5
            cands = [(a, r, b) for a, b in pairs for r in rels if holds(a, b, r) == want]
            if not cands:
                continue
            a, r, b = rng.choice(cands)
            return objs, ["is", "the", a.color, a.shape, r, "the", b.color, b.shape, "?"], want


def batch(rng, kinds, n):
    objs, qs, ys = zip(*(example(rng, rng.choice(kinds)) for _ in range(n)))
    cs = torch.full((n, 4), len(COL) * len(SH), dtype=torch.long)  # the last index: no object
    xy = torch.zeros(n, 4, 2)
    for i, os_ in enumerate(objs):
        for j, o in enumerate(os_):
            cs[i, j] = COL.index(o.color) * len(SH) + SH.index(o.shape)
            xy[i, j] = torch.tensor([(o.cx / 64 - .5) * 4, (o.cy / 64 - .5) * 4])
    q = torch.tensor([[W[w] for w in q] for q in qs])
    return cs, xy, q, torch.tensor(ys, dtype=torch.long)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm = LlamaForCausalLM(LMConfig(vocab_size=len(WORDS), hidden_size=256, intermediate_size=704,
                                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=64))
        self.obj = nn.Embedding(len(COL) * len(SH) + 1, 256)
        self.place = nn.Linear(2, 256)

    def forward(self, cs, xy, q):
        x = torch.cat([self.obj(cs) + self.place(xy), self.lm.model.embed_tokens(q)], 1)  # (B, 4 + 9, C)
        h = self.lm.model(x)[:, -1]  # (B, C)
        return self.lm.lm_head(h)[:, [NO, YES]]  # (B, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phases")
    ap.add_argument("out")
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    plan = []  # the kinds to draw from, per step
    for phase in args.phases.split(";"):
        mix, n = phase.split(":")
        kinds = [k for kv in mix.split(",") for k, w in [kv.split("=")] for _ in range(int(w))]
        plan += [kinds] * int(n)
    torch.manual_seed(0)
    rng, vrng = random.Random(0), random.Random(12345)
    val = {k: batch(vrng, [k], 1000) for k in ("spec", "sign", "side")}
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50))
    log, t0 = [], time.time()
    for step in range(1, len(plan) + 1):
        cs, xy, q, y = batch(rng, plan[step - 1], 64)
        loss = F.cross_entropy(net(cs, xy, q), y)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); sched.step()
        if step % 100 == 0 or step == len(plan):
            with torch.no_grad():
                acc = {k: (net(*v[:3]).argmax(-1) == v[3]).float().mean().item() for k, v in val.items()}
                yes = (net(*val["spec"][:3]).argmax(-1) == 1).float().mean().item()
            log.append(dict(step=step, loss=loss.item(), min=(time.time() - t0) / 60, spec_yes_rate=yes, **acc))
            print(json.dumps(log[-1]), flush=True)
            json.dump(dict(phases=args.phases, lr=args.lr, log=log), open(args.out, "w"))


if __name__ == "__main__":
    main()
