"""Building and loading the extension: a broken build names its log and changes nothing, a missing build or
DOPD_EXT=0 leaves the package on its torch code, a cached build loads at import."""

import os
import subprocess
import sys

import pytest

import dopd_kernels.ext as ext
from dopd_kernels.ext import __main__ as cli
from dopd_kernels.ext import builder as build_module

from _ext import require_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import os, sys, torch
import dopd_kernels.ext as e
from dopd_kernels import RouteConfig, routed_loss
print("available", e.is_available(), "enabled", e.enabled())
h = torch.randn(2, 5, 8, requires_grad=True)
out = routed_loss(h, torch.randn(30, 8), torch.randn(2, 5, 12), torch.randn(30, 12), h.detach() + 0.1,
                  torch.randint(0, 30, (2, 5)), config=RouteConfig(top_k=4), backend="torch")
out.loss.backward()
print("loss", bool(torch.isfinite(out.loss)))
"""


def _probe(**env) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "DOPD_EXT": "1", **env}, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def broken_sources(tmp_path, monkeypatch):
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "ops.cpp").write_text('#error "deliberately broken source"\n')
    monkeypatch.setattr(build_module, "SOURCE_DIR", src)
    monkeypatch.setenv("DOPD_EXT_CACHE", str(tmp_path / "cache"))
    return src


def test_a_broken_build_names_its_log_and_the_package_keeps_working(broken_sources, capsys):
    spec = build_module.current_spec()
    assert spec.directory.parent == broken_sources.parent / "cache"
    with pytest.raises(ext.BuildError, match="compiler log: " + str(spec.log)) as err:
        ext.build(spec=spec)
    assert "exit" in str(err.value)
    assert "deliberately broken source" in spec.log.read_text(), "the log must hold the compiler's error"
    assert not spec.ready()
    assert cli.main(["build"]) == 1  # the command: exit 1, the log's path on stderr
    assert f"compiler log: {spec.log}" in capsys.readouterr().err


def test_no_build_means_not_available_and_the_torch_code(tmp_path):
    out = _probe(DOPD_EXT_CACHE=str(tmp_path / "empty"))
    assert "available False enabled False" in out and "loss True" in out


def test_a_cached_build_loads_at_import_unless_DOPD_EXT_is_0():
    require_ext()  # builds into the default cache if needed
    assert "available True enabled True" in _probe()
    assert "available False enabled False" in _probe(DOPD_EXT="0")


def test_info_command(capsys):
    require_ext()
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "(built;" in out and '"key"' in out


def test_cpu_kernels_run_on_torchs_openmp_pool():
    """Without -fopenmp, at::parallel_for is a serial loop: the ops would run on one thread whatever torch says.
    The build links OpenMP where torch has it, and the process then holds one OpenMP runtime (torch's)."""
    require_ext()
    import torch

    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("torch without OpenMP: the ops run serially, as torch's own parallel_for does")
    spec = build_module.current_spec()
    assert "-fopenmp" in spec.cflags
    assert b"GOMP_parallel" in spec.library.read_bytes()  # the parallel regions call into libgomp
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


def test_a_damaged_marker_leaves_the_torch_code(tmp_path, monkeypatch):
    """A marker that does not parse (e.g. read while another process writes it) is a warning, not an import error."""
    spec = build_module.current_spec()
    fake = build_module.BuildSpec(spec.source_dir, spec.sources, spec.cflags, spec.cuda_cflags, spec.with_cuda,
                                  spec.key, tmp_path / "build")
    fake.directory.mkdir()
    fake.marker.write_text("{not json")
    fake.library.write_bytes(b"")
    monkeypatch.setattr(ext, "_loaded", None)
    with pytest.warns(UserWarning, match="could not load"):
        assert ext.load(fake) is False
