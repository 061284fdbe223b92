"""How zuoyou's CPU kernels are found and loaded (``zuoyou.kernels.int4``)."""

import pytest

from zuoyou.kernels import int4

pytestmark = pytest.mark.skipif(not int4.available(), reason="zuoyou's CPU kernels cannot be built here")


def test_a_build_in_the_cache_is_imported_as_it_is(monkeypatch):
    """A build already in the cache (its folder named by the sources, flags, torch and Python) is imported without
    torch's extension loader, whose ninja check rebuilt it (one to two minutes) whenever the sources sat in
    another folder than at the last build, e.g. another checkout sharing the cache: a float model, which takes the
    kernels only where they are built, would have waited for that build."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("torch's loader was called"))
    int4._module.cache_clear()
    try:
        assert int4.built()
        assert callable(int4._module().kv_attend)
    finally:
        int4._module.cache_clear()


def test_the_build_folder_names_what_the_build_depends_on(monkeypatch):
    first = int4.build_dir()
    monkeypatch.setattr(int4, "FLAGS", int4.FLAGS + ["-mavx512bf16"])
    assert int4.build_dir() != first and int4.build_dir().parent == first.parent


def test_a_damaged_build_is_not_taken_by_a_float_model(monkeypatch, tmp_path):
    """``built()`` (what a float model asks) is False for a build that cannot be loaded, and never builds."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("ZUOYOU_CACHE", str(tmp_path))
    so = int4.build_dir() / f"{int4.NAME}.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"not a shared library")
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("torch's loader was called"))
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        assert not int4.built()
