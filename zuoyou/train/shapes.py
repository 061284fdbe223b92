"""``zuoyou train shapes``: build the bundled ShapesWorld model from zero, with the Janus-Pro recipe.

Steps (each resumable; the output folder holds every intermediate):
0. tokenizer: byte-level BPE trained with ``tokenizers`` on the world's text, Janus special tokens;
1. VQ tokenizer trained on rendered scenes (``zuoyou.train.vq``), then frozen (as in Janus); (v22) its decoder
   then polished alone on whole scenes, every code kept (``polish_decoder``);
1b. (v3) the understanding encoder pre-trained on exact per-patch labels (``zuoyou.train.vit``),
   standing in for Janus's pre-trained SigLIP;
2. the unified model, three stages of the one loop (``zuoyou.train.loop``), adapted to a
   from-scratch tiny model (documented in the README):
   - stage 1 "pixel dependence": und:text:gen = 1:0:3, simple one-object prompts (Janus-Pro trains
     on ImageNet class names here). Unlike Janus, only the VQ (and a pre-trained encoder) is
     frozen: our LM starts random, so freezing it would teach nothing;
   - stage 2 unified pre-training: 2:1:7 (v3; v1 2:3:5), every caption style and question type;
   - stage 3 SFT: 3:1:6 (v3; v1 5:1:4), learning rate decayed to 2 % (most of the late gain of a
     small model).
   CFG prompt dropout (10 %) uses exactly the unconditional prompt of inference.
3. generation defaults (CFG, temperature) chosen on validation prompts (seeds disjoint from the
   evaluation), written to ``generation_defaults.json``; then the final evaluations.

The recipes (``RECIPES``, ``v27`` the default and the bundled model's) and what each one measured are in
``zuoyou.train.recipes``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from ..config import get_config
from ..loading import save_model
from ..models.janus import Janus, build
from ..models.vq import VQModel
from ..processor import Message, Processor
from ..shapes import (CATEGORIES, Prompt, Scene, caption, describe, sample_prompt, sample_question, sample_scene,
                      scene_for_prompt)
from ..tokenizer import train_tokenizer
from .batch import Example, conversation, generation_example
from .checkpoint import load_checkpoint, save_checkpoint
from .loop import Stage, train
from .reading import crowded, judged_questions, own_drawings
from .relations import (PlaceHeads, keep_places, named_objects, place_annotations, relation_questions,
                        shape_word_ids)
from .recipes import PROMPT_SHARE, RECIPES, Recipe
from .vq import (code_entropy, consolidate_codes, encode_scenes, polish_decoder, reconstruction_parse_rate, scenes_to_tensor,
                 train_vq)

TRAIN_SEED = 1  # evaluation uses other seeds (zuoyou.evals.shapes)
CFG_DROPOUT = 0.1
RECON_SHARE = 0.3  # understanding images replaced by their VQ reconstruction
OWN_SEED = 31_000_000  # prompts and sampling of the model's own drawings (training's; evaluation uses others)
BEST_OF = 4  # generation default: candidates per image, ranked by the model's own check (README "Self-check")
# generation default: up to this many more rounds of BEST_OF candidates while an image's best fails the check
# (sixteenth session, v24 on validation prompts: 0 rounds 0.901, 1 0.934, 2 0.943, 4 0.943)
REDRAWS = 2



NAMED_ORDER = ("two_object", "color_attr")  # the prompt categories ``in_named_order`` applies to
CODE_PX = 8  # side of one VQ code in pixels (64 x 64 canvas, 8 x 8 codes)


def in_named_order(scene: Scene, prompt: Prompt) -> Scene:
    """The scene with the prompt's objects reassigned so that the i-th named one is the i-th met in raster
    order (by the code row of its top edge, then its left edge). Places and sizes stay; each object takes the
    named shape, and the named colour where the prompt names one. Still satisfies ``prompt``."""
    objs = sorted(scene.objects, key=lambda o: (o.y0 // CODE_PX, o.x0))
    named = [replace(o, shape=shp, color=col or o.color) for o, (shp, col) in zip(objs, prompt.objects)]
    return replace(scene, objects=tuple(named))


def corpus(n: int = 20000, seed: int = TRAIN_SEED):
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        yield caption(rng, scene)
        _, q, a = sample_question(rng, scene)
        yield f"<|User|>: {q}\n\n<|Assistant|>: {a}"
        yield describe(scene)


@torch.no_grad()
def as_drawn(vq: VQModel, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) images -> their VQ reconstructions, rounded as when saved to a PNG."""
    x = vq.decode_code(vq.encode(images)[1]).clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1


class ShapesData:
    """Examples drawn on the fly from the world (infinite, seeded by the loop's RNG). ``draw(n, seed)``, when set,
    returns the model's own judged drawings (``zuoyou.train.reading.own_drawings``) for stages that read them."""

    def __init__(self, processor: Processor, vq: VQModel, system: str = "", questions: tuple[int, ...] = (1,),
                 draw=None):
        self.processor, self.vq, self.system, self.questions, self.draw = processor, vq, system, questions, draw
        self._pools: dict[str, list] = {}

    def own_pool(self, stage: Stage) -> list:
        """The stage's pool of the model's own judged drawings, drawn once, on first use, by the model as it is
        then (seeded by the stage's name, so a resumed stage draws the same prompts)."""
        if stage.name not in self._pools:
            if self.draw is None:
                raise ValueError(f"{stage.name} reads the model's own drawings, but ShapesData was given no draw")
            self._pools[stage.name] = self.draw(stage.options["own_pool"], OWN_SEED + zlib.crc32(stage.name.encode()))
        return self._pools[stage.name]

    def examples(self, kind: str, n: int, rng: random.Random, stage: Stage) -> list[Example]:
        proc = self.processor
        if kind == "gen":
            simple = stage.options.get("simple", False)
            share = stage.options.get("prompt_share", PROMPT_SHARE)
            weights = stage.options.get("category_weights")  # None: uniform, drawing no extra random number
            named = stage.options.get("named_order", False)
            scenes, prompts = [], []
            for _ in range(n):
                if rng.random() < share:  # a GenEval-style prompt, a scene satisfying it
                    cat = rng.choices(CATEGORIES, weights)[0] if weights else None
                    p = sample_prompt(rng, rng.choice(["single_object", "colors"]) if simple else cat)
                    scene, text = scene_for_prompt(rng, p), p.text
                    if named and p.category in NAMED_ORDER:
                        scene = in_named_order(scene, p)
                else:  # a richer caption of a random scene
                    scene = sample_scene(rng, n=1 if simple else None)
                    text = caption(rng, scene)
                scenes.append(scene)
                prompts.append((text, rng.random() < CFG_DROPOUT))
            codes = encode_scenes(self.vq, scenes)
            return [generation_example(proc, p, c, drop) for (p, drop), c in zip(prompts, codes)]
        scenes = [sample_scene(rng) for _ in range(n)]
        # several questions about one image in one conversation: the image (64 positions) is
        # paid for once and each answer is a target; the first turn is exactly the inference prompt
        # (a single choice draws no random number, so v1's data stream is the one it was built with)
        count = (lambda: rng.choice(self.questions)) if len(self.questions) > 1 else (lambda: self.questions[0])
        qas = [[sample_question(rng, s)[1:] for _ in range(count())] for s in scenes]
        if kind == "und":
            if stage.options.get("crowded_share"):  # (v19) counts past four
                for i in range(n):
                    if rng.random() < stage.options["crowded_share"]:
                        scenes[i], qas[i] = crowded(rng)
            if stage.options.get("relations"):  # (v25) the relations curriculum (``zuoyou.train.relations``)
                o = stage.options
                for i in range(n):
                    if rng.random() < o["relation_share"]:
                        qas[i] = relation_questions(rng, scenes[i], o["relations"], o["relation_questions"]) or qas[i]
            own = {}
            if stage.options.get("own_share"):  # (v20) the model's own drawings, as the judge reads them
                pool = self.own_pool(stage)
                for i in range(n):
                    if rng.random() < stage.options["own_share"]:
                        img, objs = pool[rng.randrange(len(pool))]
                        own[i] = img
                        qas[i] = judged_questions(rng, objs)
            images = scenes_to_tensor(scenes)
            # a share of VQ reconstructions, so that the model also reads images drawn by a model
            recon = [i for i in range(n) if rng.random() < RECON_SHARE and i not in own]
            if recon:
                images[recon] = as_drawn(self.vq, images[recon])
            for i, img in own.items():
                images[i] = img
            out = [self._dialogue(q, img) for q, img in zip(qas, images)]
            if stage.options.get("place_aux"):  # (v26) targets of the training-only place heads
                shape_ids = shape_word_ids(proc.tokenizer)
                for i, e in enumerate(out):
                    if i not in own:
                        named = [named_objects(q, scenes[i]) for q, _ in qas[i]]
                        e.places, e.pairs = place_annotations(e.ids, e.loss_mask, shape_ids, named)
            return out
        # text-only: the scene is given in words, the questions are the same
        return [self._dialogue(q, None, f"Scene: {describe(s)}.\n") for s, q in zip(scenes, qas)]

    def _dialogue(self, qas: list[tuple[str, str]], image, prefix: str = "") -> Example:
        msgs = []
        for i, (q, a) in enumerate(qas):
            msgs.append(Message("user", (prefix if i == 0 else "") + q, [image] if i == 0 and image is not None else []))
            msgs.append(Message("assistant", a))
        ids, mask = conversation(self.processor, msgs, self.system)
        return Example(ids, mask.index(True), image=image, loss_mask=mask)


def stages(minutes: float, batch_size: int = 64, recipe: Recipe = RECIPES["v27"]) -> list[Stage]:
    m1, m2, m3 = (share * minutes for share in recipe.shares)
    mix2, mix3 = recipe.mixes
    # a pre-trained encoder stays frozen while the random aligner learns to read it (Janus stage 1)
    frozen = ("gen_vision_model.", "vision_model.") if recipe.encoder_minutes else ("gen_vision_model.",)
    gen_opts = {"prompt_share": recipe.prompt_share}
    out = [
        Stage("stage1", lr=1e-3, minutes=m1, warmup=100, mix=(1, 0, 3), batch_size=batch_size, options={"simple": True},
              frozen=frozen),
        Stage("stage2", lr=1e-3, minutes=m2, warmup=0, mix=mix2, batch_size=batch_size, options=dict(gen_opts)),
        Stage("stage3", lr=1e-3, minutes=m3, warmup=0, decay=True, mix=mix3, batch_size=batch_size, options=dict(gen_opts)),
    ]
    if recipe.stage3b:
        m4, lr4, share = recipe.stage3b
        out += [Stage(f"stage3{chr(ord('b') + i)}", lr=lr4, minutes=m4, warmup=50, decay=True, mix=mix3,
                      batch_size=batch_size, options={"prompt_share": share}) for i in range(recipe.restarts)]
    for i, (name, minutes_, kinds) in enumerate(recipe.relation_stages):
        opts = {"prompt_share": recipe.stage3b[2] if recipe.stage3b else recipe.prompt_share, "relations": dict(kinds),
                "relation_share": recipe.relation_share, "relation_questions": recipe.relation_questions}
        if i == 0 and recipe.place_steps:
            opts["keep_places"] = recipe.place_steps
        if recipe.place_aux:
            opts["place_aux"] = True
        # (v26) with the place heads, the encoder stays as keep_places left it (as in the probe that measured them)
        frozen = ("gen_vision_model.", "vision_model.") if recipe.place_aux else ("gen_vision_model.",)
        out.append(Stage(name, lr=recipe.relation_lr, minutes=minutes_, warmup=50,
                         decay=i == len(recipe.relation_stages) - 1 or name in recipe.decayed,
                         mix=recipe.relation_mix, batch_size=batch_size,
                         options=opts, frozen=frozen))
    for st in out:
        if st.name in recipe.named_order:
            st.options["named_order"] = True
        if st.name in recipe.weighted:
            st.options["category_weights"] = recipe.category_weights
        if st.name in recipe.crowded:
            st.options["crowded_share"] = recipe.crowded_share
        if st.name in recipe.own:
            st.options.update(own_share=recipe.own_share, own_pool=recipe.own_pool)
    return out


def build_shapes_model(out: Path, vq: VQModel, vocab: int, seed: int, embed_from_codebook: bool = False,
                       gen_embed_dim: int = 8, gen_embed_std: float = 0.02) -> Janus:
    cfg = get_config("shapes")
    cfg.lm.vocab_size = vocab
    cfg.gen_embed_dim = gen_embed_dim
    torch.manual_seed(seed)
    model = build(cfg, "cpu")
    _init(model)
    if gen_embed_std != 0.02:  # (a condition, so that v1-v3 draw the random numbers they were built with)
        with torch.no_grad():
            torch.nn.init.normal_(model.gen_embed.weight, std=gen_embed_std)
    model.gen_vision_model.load_state_dict(vq.state_dict())
    if embed_from_codebook:  # codes that look alike start with alike input embeddings (8-d, as the codebook)
        with torch.no_grad():
            model.gen_embed.weight.copy_(vq.quantize.codebook())
    return model


def _init(model: torch.nn.Module, std: float = 0.02):
    for name, p in model.named_parameters():
        if name.startswith("gen_vision_model."):
            continue
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def run(out: Path, minutes: float | None = None, vq_minutes: float | None = None, seed: int = TRAIN_SEED,
        resume: bool = True, eval_images: int = 4, log=print, recipe: str = "v27") -> dict:
    """Train everything into ``out``; the loadable model folder is ``out/model``. Budgets default to the recipe's."""
    rec = RECIPES[recipe]
    minutes = rec.minutes if minutes is None else minutes
    vq_minutes = rec.vq_minutes if vq_minutes is None else vq_minutes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.time()
    report = json.loads((out / "report.json").read_text()) if resume and (out / "report.json").is_file() else {}

    # 0. tokenizer
    tok_path = out / "tokenizer.json"
    if not (resume and tok_path.is_file()):
        train_tokenizer(corpus(), vocab_size=512).save(str(tok_path))
    processor = Processor.from_folder(out, num_image_tokens=64, image_size=64, system_prompt="")
    vocab = processor.tokenizer.get_vocab_size(with_added_tokens=True)
    log(f"tokenizer: {vocab} tokens")

    # 1. VQ
    cfg = get_config("shapes")
    torch.manual_seed(seed)
    vq = VQModel(cfg.vq)
    if not report.get("vq_done"):
        train_vq(vq, out / "vq", minutes=vq_minutes, seed=seed, log=log, resume=resume, **rec.vq)
        vq.eval()
        report["recipe"] = recipe
        if rec.fold_codes:
            report["vq_trained"] = {"parse_rate": reconstruction_parse_rate(vq, n=1000),
                                    "code_entropy": round(code_entropy(vq), 4)}
            report["vq_folded_codes"] = consolidate_codes(vq) + consolidate_codes(vq, seed=6)
        report["vq_parse_rate"] = reconstruction_parse_rate(vq, n=1000)
        report["vq_code_entropy"] = round(code_entropy(vq), 4)
        save_checkpoint(out / "vq_final", vq, folded=report.get("vq_folded_codes", 0))
        report["vq_done"] = True
        _write(out / "report.json", report)
    else:  # (runs from before vq_final existed kept the VQ in vq/ only)
        load_checkpoint(out / "vq_final" if (out / "vq_final").is_dir() else out / "vq", vq)
    log(f"vq: held-out reconstructions parse back exactly: {report['vq_parse_rate']:.4f}; "
        f"H(code | patch) {report['vq_code_entropy']:.3f} nats")
    if rec.decoder_minutes and not report.get("decoder_done"):
        polish_decoder(vq, out / "decoder", rec.decoder_minutes, seed=seed + 777, log=log, resume=resume)
        report["vq_parse_rate_polished"] = reconstruction_parse_rate(vq, n=1000)
        log(f"vq, decoder polished: held-out reconstructions parse back exactly: {report['vq_parse_rate_polished']:.4f}")
        save_checkpoint(out / "vq_final", vq, folded=report.get("vq_folded_codes", 0))
        report["decoder_done"] = True
        _write(out / "report.json", report)
    vq.eval().requires_grad_(False)

    # 2. unified model (its understanding encoder pre-trained first if the recipe says so), three stages
    model = build_shapes_model(out, vq, max(vocab, 64), seed, rec.embed_from_codebook, rec.gen_embed_dim,
                               rec.gen_embed_std)
    if rec.encoder_minutes:
        _pretrained_encoder(model, vq, out, rec.encoder_minutes, seed, report, resume, log, rec.encoder_absolute)
    if rec.place_aux:  # in the checkpoints from the first one on (seed_from_model attaches them too)
        PlaceHeads.attach(model)
    processor.num_image_tokens = cfg.vision.num_patches

    def drawings(n: int, seed: int):
        # a resumed LM checkpoint holds the VQ as it was then, its decoder perhaps not yet polished
        model.gen_vision_model.load_state_dict(vq.state_dict())
        return own_drawings(_pipeline(model, processor, None), n, seed, log=log)

    data = ShapesData(processor, vq, questions=rec.questions, draw=drawings)

    def stage_eval(st: Stage) -> dict:
        from ..evals.shapes import quick_eval

        return quick_eval(_pipeline(model, processor, None), log=log)

    def stage_start(st: Stage) -> None:
        if st.options.get("keep_places"):  # (v25) image tokens that keep their place (zuoyou.train.relations)
            def images(r, n):
                x = scenes_to_tensor([sample_scene(r) for _ in range(n)])
                recon = [i for i in range(n) if r.random() < RECON_SHARE]
                if recon:
                    x[recon] = as_drawn(vq, x[recon])
                return x

            report.setdefault("keep_places", {})[st.name] = keep_places(model, st.options["keep_places"], seed=seed,
                                                                      images=images, log=log)
            _write(out / "report.json", report)

    history = train(model, stages(minutes, recipe=rec), data, out, seed=seed, resume=resume, on_stage_end=stage_eval, log=log,
                    compile=rec.compile, on_stage_start=stage_start)
    report["training"] = history
    report["train_minutes_this_run"] = round((time.time() - t_start) / 60, 1)
    PlaceHeads.detach(model)  # training-only: the model folder holds the model alone
    model.gen_vision_model.load_state_dict(vq.state_dict())  # (as in drawings above)
    folder = out / "model"
    save_model(model, folder)
    shutil.copy(tok_path, folder / "tokenizer.json")

    # 3. generation defaults picked on validation prompts
    from ..evals.shapes import choose_defaults

    defaults = choose_defaults(_pipeline(model, processor, None), log=log)
    # each image the best of BEST_OF candidates by the model's own answers (zuoyou.shapes.checks); the
    # search above ranks plain draws, which leaves the same choice (v9, validation: CFG 3 / T 0.6 stays
    # ahead of CFG 3 / T 0.8 with four candidates, 0.592 vs 0.556)
    # cpu_dtype: bf16 where this CPU's bf16 products are the faster (v27 on a Zen 4: 16 candidates drawn and checked
    # ~35 % faster, GenEval on 9 seeds 0.947 vs 0.950 in fp32, within noise; training log, twenty-fourth session)
    defaults.update(text_temperature=0.0, max_new_tokens=48, system_prompt="", self_check="shapes", best_of=BEST_OF,
                    redraws=REDRAWS, cpu_dtype="bf16")
    _write(folder / "generation_defaults.json", defaults)
    report["defaults"] = defaults
    report["recipe"] = recipe  # (a folder continued with a later recipe names the last)
    _write(out / "report.json", report)
    return report


def seed_from_model(out: Path, folder: Path, recipe: str, minutes: float | None = None, seed: int = TRAIN_SEED,
                    log=print) -> None:
    """Start the run folder ``out`` from a finished model folder (e.g. the bundled one) instead of from zero: its
    tokenizer, VQ and encoder, and an LM checkpoint past the stages its ``training_report.json`` lists, so that
    ``run(out, recipe=recipe)`` goes on with the recipe's later stages. The stages done must be the recipe's first
    ones. A folder that holds a checkpoint already is left alone (the run resumes)."""
    from ..errors import CheckpointError
    from ..loading import load_model

    out, folder = Path(out), Path(folder)
    if (out / "checkpoint").exists():
        return
    rep_path = folder / "training_report.json"
    if not rep_path.is_file():
        raise CheckpointError(f"{folder}: no training_report.json, so which stages it went through is unknown")
    rep = json.loads(rep_path.read_text())
    done = [s["stage"] for s in rep["training"]["stages"]]
    rec = RECIPES[recipe]
    names = [st.name for st in stages(rec.minutes if minutes is None else minutes, recipe=rec)]
    if names[:len(done)] != done:
        raise CheckpointError(f"{folder} went through stages {', '.join(done)}; recipe {recipe} starts with "
                              f"{', '.join(names[:len(done)])}")
    model, _ = load_model(folder, torch.device("cpu"), torch.float32)
    if rec.place_aux:  # as run() holds them
        PlaceHeads.attach(model)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "tokenizer.json", out / "tokenizer.json")
    save_checkpoint(out / "vq_final", model.gen_vision_model)
    save_checkpoint(out / "encoder", model.vision_model)
    report = {k: rep[k] for k in ("vq_parse_rate", "vq_code_entropy", "vq_parse_rate_polished", "encoder") if k in rep}
    report.update(vq_done=True, decoder_done=True, encoder_done=True, recipe=rep.get("recipe"),
                  seeded_from=f"{folder} (recipe {rep.get('recipe')}, stages {done[0]}..{done[-1]})")
    rng = random.Random(seed)
    save_checkpoint(out / "checkpoint", model, stage=len(done), step=0, elapsed=0.0, rng=rng.getstate(),
                    torch_rng=torch.get_rng_state().tolist(), history=rep["training"], total_steps=0)
    _write(out / "report.json", report)
    log(f"run folder {out} seeded from {folder}: stages {', '.join(done)} done; next {names[len(done)] if len(done) < len(names) else 'none'}")


def _pretrained_encoder(model: Janus, vq: VQModel, out: Path, minutes: float, seed: int, report: dict, resume: bool,
                        log, absolute: bool = False) -> None:
    """Pre-train ``model.vision_model`` (or load it from ``out/encoder`` when done before)."""
    from .vit import pretrain_encoder

    tower = model.vision_model
    if resume and report.get("encoder_done"):
        load_checkpoint(out / "encoder", tower)
        return

    # a share of VQ reconstructions, as the LM stages use
    report["encoder"] = pretrain_encoder(tower, minutes, seed=seed, reconstruct=lambda x: as_drawn(vq, x),
                                         recon_share=RECON_SHARE, log=log, absolute=absolute)
    log(f"encoder pre-training: {report['encoder']}")
    save_checkpoint(out / "encoder", tower)
    report["encoder_done"] = True
    _write(out / "report.json", report)


def _pipeline(model: Janus, processor: Processor, defaults):
    from ..api import GenerationDefaults, Pipeline
    from ..engine import Engine

    d = GenerationDefaults(**(defaults or {"system_prompt": ""}))
    return Pipeline(Engine(model, processor, torch.device("cpu"), torch.float32), d, None)


def _write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
