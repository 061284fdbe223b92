"""The ``zuoyou`` command line on the tiny checkpoint: outputs, stdout hygiene, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zuoyou.cli import main
from zuoyou.errors import ConfigError, InputError

QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(20, 12), (9, 30)]):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_one_file(tiny_dir, tiny_pipe, tmp_path, capsys):
    out = tmp_path / "sub" / "x.png"
    rc, stdout, _ = run(capsys, "generate", "a red circle", "--model", tiny_dir, "--device", "cpu", "-o", out,
                        "--seed", 3, "--cfg", 2, "--temperature", 0.9)
    assert rc == 0 and stdout == f"{out}\n"
    got = np.asarray(Image.open(out))
    want = np.asarray(tiny_pipe.generate("a red circle", seed=3, cfg=2, temperature=0.9)[0])
    assert got.shape == (16, 16, 3) and np.array_equal(got, want)


def test_generate_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "many"
    rc, stdout, _ = run(capsys, "generate", "a blue square", "--model", tiny_dir, "-n", 2, "-o", out, "--seed", 1,
                        "--top-k", 8, "--top-p", 0.9)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]
    assert stdout.splitlines() == [str(out / "0000.png"), str(out / "0001.png")]
    assert all(Image.open(out / n).size == (16, 16) for n in ("0000.png", "0001.png"))


def test_ask_one_and_two_images(tiny_dir, tiny_pipe, images, capsys):
    kw = dict(temperature=0, max_new_tokens=6)
    rc, stdout, _ = run(capsys, "ask", QUESTION, "--image", images[0], "--model", tiny_dir, "--temperature", 0,
                        "--max-new-tokens", 6)
    assert rc == 0 and stdout == tiny_pipe.ask(images[0], QUESTION, **kw) + "\n"
    rc, stdout2, _ = run(capsys, "ask", QUESTION, "--image", images[0], "--image", images[1], "--model", tiny_dir,
                         "--temperature", 0, "--max-new-tokens", 6)
    assert rc == 0 and stdout2 == tiny_pipe.ask(images, QUESTION, **kw) + "\n"


def _bad_cases(tiny_dir, images, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(images[0].read_bytes()[:60])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hi")
    gen = ["generate", "--model", tiny_dir, "-o", tmp_path / "o.png"]
    ask = ["ask", "--model", tiny_dir, "--image", images[0]]
    return {
        "n=0": (gen + ["a red circle", "-n", 0], "n=0"),
        "cfg=-1": (gen + ["a red circle", "--cfg", -1], "cfg=-1"),
        "temperature=-1": (gen + ["a red circle", "--temperature", -1], "temperature=-1"),
        "ask temperature=-1": (ask + [QUESTION, "--temperature", -1], "temperature=-1"),
        "empty prompt": (gen + ["   "], "empty"),
        "empty question": (ask + [""], "empty"),
        "not a checkpoint": (["generate", "a red circle", "--model", notes, "-o", tmp_path / "o.png"],
                             "not a checkpoint folder"),
        "missing model": (["generate", "a red circle", "--model", tmp_path / "nope", "-o", tmp_path / "o.png"],
                          "no such folder"),
        "corrupt image": (["ask", QUESTION, "--model", tiny_dir, "--image", corrupt], "corrupt.png"),
        "missing image": (["ask", QUESTION, "--model", tiny_dir, "--image", tmp_path / "gone.png"], "no such file"),
        "long prompt": (gen + ["a red circle " * 200], "prompt too long"),
        "long question": (ask + [QUESTION * 150], "prompt too long"),
        "bad device": (gen + ["a red circle", "--device", "gpu0"], "device"),
        "bad dtype": (gen + ["a red circle", "--dtype", "int4"], "dtype"),
        "max new tokens": (ask + [QUESTION, "--max-new-tokens", 0], "max_new_tokens=0"),
    }


def test_bad_inputs_exit_2_with_one_line(tiny_dir, images, tmp_path, capsys):
    for name, (argv, fragment) in _bad_cases(tiny_dir, images, tmp_path).items():
        rc, stdout, stderr = run(capsys, *argv)
        assert rc == 2, name
        errors = [line for line in stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("zuoyou: error: ") and fragment in errors[0], (name, stderr)
        assert "Traceback" not in stderr and stdout == "", (name, stderr, stdout)
    assert not (tmp_path / "o.png").exists()


def test_debug_reraises(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="empty"):
        main(["--debug", "generate", " ", "--model", str(tiny_dir), "-o", str(tmp_path / "o.png")])
    with pytest.raises(ConfigError):
        main(["--debug", "generate", "x", "--model", str(tiny_dir), "--device", "gpu0", "-o", str(tmp_path / "o.png")])


def _subprocess(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "zuoyou.cli", *map(str, argv)], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=120)


def test_subprocess_stdout_is_only_the_answer(tiny_dir, tiny_pipe, images):
    r = _subprocess("ask", QUESTION, "--image", images[0], "--model", tiny_dir, "--temperature", 0,
                    "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    assert r.stdout == tiny_pipe.ask(images[0], QUESTION, temperature=0, max_new_tokens=6) + "\n"
    assert "loading" in r.stderr  # logs go to stderr

    r = _subprocess("ask", QUESTION, "--image", images[0], "--model", tiny_dir, "--temperature", "-1")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1].startswith("zuoyou: error: temperature=-1") and "Traceback" not in r.stderr


def test_train_recipes_are_the_registrys():
    """The CLI lists the recipes by hand (parsing stays free of torch); they must be ``RECIPES``, with the
    same default as ``run``."""
    import inspect

    from zuoyou.cli import build_parser
    from zuoyou.train.recipes import RECIPES
    from zuoyou.train.shapes import run

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    shapes = next(a for a in train._actions if a.dest == "what").choices["shapes"]
    recipe = next(a for a in shapes._actions if a.dest == "recipe")
    assert recipe.choices == list(RECIPES) and recipe.default == inspect.signature(run).parameters["recipe"].default
