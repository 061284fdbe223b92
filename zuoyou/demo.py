"""``zuoyou demo``: a small gallery showing both hands at work.

Prompts -> images (the model draws), then questions about those very images -> answers (the
model looks), with the judge's verdict beside each. Written as ``index.html`` and ``index.md``.
"""

from __future__ import annotations

import html
from pathlib import Path

DEMO_PROMPTS = [
    "a photo of a cross",
    "a photo of a red circle left of a blue square",
    "a photo of three triangles",
    "a photo of a yellow square",
    "a photo of a green cross above a purple circle",
    "a photo of a cyan triangle and a red square",
]
DEMO_QUESTIONS = ["How many objects are there?", "Describe the image."]


def make_demo(pipe, out: Path, prompts=DEMO_PROMPTS, images_per_prompt: int = 2, seed: int = 0, log=None) -> Path:
    from .shapes import check, parse_image, parse_prompt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reqs = [pipe.image_request(p, n=images_per_prompt, seed=seed + i) for i, p in enumerate(prompts)]
    outs = pipe.engine.generate_images(reqs)
    rows = []
    for i, (prompt, imgs) in enumerate(zip(prompts, outs)):
        for j, img in enumerate(imgs):
            name = f"{i:02d}_{j}.png"
            img.save(out / name)
            try:
                verdict = "pass" if check(parse_prompt(prompt), parse_image(img)) else "fail"
            except ValueError:  # a prompt outside the GenEval grammar: nothing to judge
                verdict = "-"
            qa = [(q, pipe.ask(img, q)) for q in DEMO_QUESTIONS]
            rows.append((prompt, name, verdict, qa))
        if log:
            log(f"demo: {i + 1}/{len(prompts)} prompts")
    md = ["# zuoyou demo", "", "The model draws each prompt, then answers questions about its own drawings.", "",
          "| prompt | image | judge | questions and answers |", "|---|---|---|---|"]
    for prompt, name, verdict, qa in rows:
        answers = "<br>".join(f"{q} → **{a}**" for q, a in qa)
        md.append(f"| {prompt} | ![]({name}) | {verdict} | {answers} |")
    (out / "index.md").write_text("\n".join(md) + "\n")
    body = "".join(
        f"<tr><td>{html.escape(p)}</td><td><img src='{n}' width='128' style='image-rendering:pixelated'></td>"
        f"<td>{v}</td><td>{'<br>'.join(f'{html.escape(q)} → <b>{html.escape(a)}</b>' for q, a in qa)}</td></tr>"
        for p, n, v, qa in rows)
    (out / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>zuoyou demo</title>"
        "<style>body{font-family:sans-serif}td{padding:6px;border-bottom:1px solid #ddd}</style>"
        "<h1>zuoyou demo</h1><p>The model draws each prompt, then answers questions about its own drawings.</p>"
        f"<table><tr><th>prompt</th><th>image</th><th>judge</th><th>questions and answers</th></tr>{body}</table>\n")
    return out / "index.html"
