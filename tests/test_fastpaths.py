"""Fast paths that check themselves (issue 23): the check, its cache, auto's fallbacks.

No GPU here: a CUDA machine is simulated by making every device "need the check"
(mlfd.fastpaths.environment, where every caller looks machine facts up); the check itself
then runs on this CPU (the Triton kernel under the interpreter, DALI in CPU mode) and each
failure is brought about by a monkeypatch.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import run
from packaging.requirements import Requirement

import mlfd.fastpaths as fastpaths
import mlfd.fastpaths.checks as fastchecks
import mlfd.fastpaths.environment as environment
from mlfd.engine.metrics import read_jsonl
from mlfd.losses.kd import kd_loss_reference, resolve_backend
from mlfd.stages.common import RunOptions

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FIX_TRITON = "pip install -U triton, then `mlfd info --check --refresh`"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Verdicts go to a private folder, never the user's cache."""
    d = tmp_path / "user-cache"
    monkeypatch.setenv("MLFD_CACHE_DIR", str(d))
    return d


@pytest.fixture
def checks(monkeypatch):
    """The devices the check was run for (a cached verdict adds nothing)."""
    calls = []
    real = fastchecks.run_all

    def counted(device):
        calls.append(device)
        return real(device)

    monkeypatch.setattr(fastchecks, "run_all", counted)
    return calls


@pytest.fixture
def cuda_like(monkeypatch):
    """Decide as on a CUDA machine: auto and explicit choices go by the check."""
    monkeypatch.setattr(environment, "needs_check", lambda device: True)


def stub(monkeypatch, *paths):
    """Probes a test is not about pass without running (keeps the test fast)."""
    for path in paths:
        monkeypatch.setitem(fastchecks.PROBES, path,
                            lambda device, rows, p=path: fastchecks._row(p, "ok", "stub"))


def warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


def errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def rows_of(report) -> dict:
    return {r["path"]: r for r in report["rows"]}


def distill(capsys, ws, *extra):
    """Retrain the finished experiment's student (teachers, caches, joint are reused)."""
    return run(capsys, "distill", "--workdir", ws, "--dataset", "alpha", "--levels", 2,
               "--force", "--device", "cpu", "--json", *extra)


def recorded(ws) -> tuple[dict, list[dict]]:
    d = ws / "students" / "alpha" / "L2"
    return json.loads((d / "last.json").read_text()), read_jsonl(d / "metrics.jsonl")


# ---- the check on this machine, and its cache ------------------------------------------------

def test_info_check_runs_once_per_environment(capsys, checks, cache):
    from mlfd.data.pipelines import dali_available

    code, out, err = run(capsys, "info", "--check", "--json")
    assert code == 0, err
    doc = json.loads(out)
    rows = doc["check"]["rows"]
    assert [r["path"] for r in rows] == list(fastpaths.PATHS)
    assert all(r["status"] in fastpaths.STATUSES and r["detail"] for r in rows)
    by = rows_of(doc["check"])
    # TRITON_INTERPRET=1 (conftest): the kernel ran against the torch loss on CPU
    assert by["triton"]["status"] == "ok" and "interpreter" in by["triton"]["detail"]
    assert by["compile"]["status"] == "unavailable"
    assert by["dali_gpu_decode"]["status"] == by["dali_gpu_arrays"]["status"] == "unavailable"
    assert by["dali_cpu"]["status"] == ("ok" if dali_available() else "unavailable")
    assert by["bf16"]["status"] == by["fp16"]["status"] == "ok"
    assert doc["check"]["cached"] is False and len(checks) == 1
    assert Path(doc["check"]["cache_file"]).parent.parent == cache
    # CPU: auto is what it always was
    assert (doc["default_loss_backend"], doc["default_precision"]) == ("torch", "fp32")
    assert doc["dali_cuda"] == (13 if "nvidia-dali-cuda130" in doc["dali_wheels"] else
                                doc["dali_cuda"]) and doc["driver_cuda"] is None

    code, out, _ = run(capsys, "info", "--check", "--json")
    again = json.loads(out)
    assert code == 0 and again["check"]["cached"] is True and len(checks) == 1
    assert again["check"]["rows"] == rows
    # --refresh runs it again
    code, out, _ = run(capsys, "info", "--check", "--refresh", "--json")
    assert code == 0 and json.loads(out)["check"]["cached"] is False and len(checks) == 2


def test_cpu_runs_need_no_check(checks, cache):
    opts = RunOptions(device=CPU)
    assert fastpaths.loss_backend(opts, "auto") == "torch"
    assert fastpaths.precision(opts) == "fp32"
    from mlfd.data.pipelines import resolve_pipeline

    assert fastpaths.pipeline_backend(opts) == resolve_pipeline("auto")
    assert checks == [] and not cache.exists()
    # auto alone never picks the kernel, on any device: only a passed check does
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


def test_a_damaged_or_foreign_cache_is_checked_again(monkeypatch, checks):
    stub(monkeypatch, *fastpaths.PATHS)
    first = fastpaths.check(CPU)
    path = Path(first["cache_file"])
    assert fastpaths.check(CPU)["cached"] is True and len(checks) == 1
    path.write_text("{not json")
    assert fastpaths.check(CPU)["cached"] is False and len(checks) == 2
    doc = json.loads(path.read_text())
    doc["rows"][0]["status"] = "probably"  # not a status: the file is not trusted
    path.write_text(json.dumps(doc))
    assert fastpaths.check(CPU)["cached"] is False and len(checks) == 3
    # another torch is another environment
    monkeypatch.setattr(torch, "__version__", "2.15.0")
    assert fastpaths.check(CPU)["cached"] is False and len(checks) == 4


def test_an_unwritable_cache_is_said_not_fatal(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFD_CACHE_DIR", str(blocker))
    stub(monkeypatch, *fastpaths.PATHS)
    report = fastpaths.check(CPU)
    assert report["cached"] is False and len(report["rows"]) == len(fastpaths.PATHS)
    assert "not cached" in capsys.readouterr().err


def test_on_cuda_each_failure_gets_a_fresh_process():
    # no CUDA here: the fp16 probe fails in its child, which stops; the next probe runs in
    # a new one (a faulted kernel can leave a CUDA context unusable)
    rows = fastchecks.run_isolated(torch.device("cuda"), ["fp16", "dali_driver"])
    assert [r["path"] for r in rows] == ["fp16", "dali_driver"]
    assert rows[0]["status"] == "failed" and rows[0]["fix"]
    assert rows[1] == dict(fastchecks.probe_dali_driver(torch.device("cuda"), {}),
                           seconds=rows[1]["seconds"])
    # a child that dies (here: killed at its timeout) fails its probe, and only that one
    rows = fastchecks.run_isolated(CPU, ["compile", "dali_driver"], timeout=0.5)
    assert [(r["path"], r["status"], r["detail"]) for r in rows] == [
        ("compile", "failed", "timed out after 0.5 s"),
        ("dali_driver", "failed", "timed out after 0.5 s")]


# ---- failures, fallbacks, records ------------------------------------------------------------

def _launch_fails(*args):
    raise RuntimeError("Triton Error [CUDA]: invalid device context\n(at the first launch)")


def _off_by_one_percent(s, t, y, us, vs, cfg):
    loss, terms = kd_loss_reference(s, t, y, us, vs, cfg)
    return loss * 1.01, terms


@pytest.mark.parametrize("kernel, cause", [
    (_launch_fails, "RuntimeError: Triton Error [CUDA]: invalid device context"),
    (_off_by_one_percent, "the loss differs from the torch loss by"),
])
def test_a_failing_kernel_falls_back_to_the_torch_loss(kernel, cause, ws, capsys, monkeypatch,
                                                       cuda_like, checks):
    import mlfd_kernels.kd_loss

    monkeypatch.setattr(mlfd_kernels.kd_loss, "kd_loss_triton", kernel)
    stub(monkeypatch, "dali_cpu", "bf16", "fp16")
    code, out, err = distill(capsys, ws, "--pipeline", "torch", "--precision", "fp32")
    assert code == 0, err
    (line,) = warnings(err)
    assert line.startswith(f"warning: Triton KD kernel failed ({cause}")
    assert line.endswith(f"): using the torch loss; {FIX_TRITON}")
    meta, rows = recorded(ws)
    assert meta["loss_backend"] == "torch" and meta["precision"] == "fp32"
    assert rows and all(r["loss_backend"] == "torch" and r["pipeline"] == "torch"
                        and r["precision"] == "fp32" for r in rows)
    assert len(checks) == 1
    # the next run reads the verdict: same fallback, same one warning, no new check
    code, _, err = distill(capsys, ws, "--pipeline", "torch", "--precision", "fp32")
    assert code == 0 and len(warnings(err)) == 1 and len(checks) == 1
    # asked for by name, a failed kernel is an error, before anything is written
    before = meta["fingerprint_digest"], (ws / "students/alpha/L2/last.json").stat().st_mtime_ns
    code, _, err = distill(capsys, ws, "--pipeline", "torch", "--loss-backend", "triton")
    (line,) = errors(err)
    assert code == 2 and "Traceback" not in err
    assert line.startswith("error: loss backend triton: Triton KD kernel failed on this machine")
    assert cause in line
    assert (ws / "students/alpha/L2/last.json").stat().st_mtime_ns == before[1]


def test_the_kernel_that_passes_is_used(monkeypatch, cuda_like):
    stub(monkeypatch, "dali_cpu", "bf16", "fp16")
    opts = RunOptions(device=CPU)
    assert fastpaths.loss_backend(opts, "auto") == "triton"  # ran under the interpreter
    monkeypatch.setitem(fastchecks.PROBES, "triton", lambda d, r: fastchecks._row(
        "triton", "unavailable", "triton is not importable", "pip install triton"))
    monkeypatch.setitem(fastchecks.PROBES, "compile", lambda d, r: fastchecks._row(
        "compile", "ok", "stub"))
    report = fastpaths.check(CPU, refresh=True)
    assert fastpaths.choose("loss", report) == (
        "compile", "Triton KD kernel unavailable (triton is not importable): using torch.compile "
                   "of the loss; pip install triton")


def test_dali_gpu_build_that_raises_falls_back_to_dali_cpu(ws, capsys, monkeypatch, cuda_like,
                                                           checks):
    pytest.importorskip("nvidia.dali")
    # as if CUDA and the driver were fine: the GPU pipeline is built, and raises here
    monkeypatch.setattr(environment, "driver_cuda_version", lambda: (13, 0))
    monkeypatch.setattr(environment, "dali_wheels", lambda: {"nvidia-dali-cuda130": "2.4.0"})
    monkeypatch.setattr(fastchecks, "_dali_gpu_blocked", lambda path, device, rows: None)
    stub(monkeypatch, "triton", "bf16", "fp16")
    code, out, err = distill(capsys, ws, "--loss-backend", "torch", "--precision", "fp32")
    assert code == 0, err
    (line,) = warnings(err)
    assert line.startswith("warning: DALI GPU decoding failed (")
    assert "): using DALI CPU; " in line
    meta, rows = recorded(ws)
    assert meta["pipeline"] == "dali-cpu" and all(r["pipeline"] == "dali-cpu" for r in rows)
    assert {r["pipeline"] for r in json.loads(out)["rows"] if r.get("top1") is not None
            and r["model"] != "joint"} == {"dali-cpu"}  # eval's rows too
    code, _, err = distill(capsys, ws, "--loss-backend", "torch", "--precision", "fp32")
    assert code == 0 and len(warnings(err)) == 1 and len(checks) == 1
    code, _, err = distill(capsys, ws, "--pipeline", "dali", "--loss-backend", "torch")
    (line,) = errors(err)
    assert code == 2 and line.startswith("error: --pipeline dali: DALI GPU decoding failed")


def test_an_old_driver_decodes_on_the_cpu(ws, capsys, monkeypatch, cuda_like, checks):
    pytest.importorskip("nvidia.dali")
    monkeypatch.setattr(environment, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(environment, "dali_wheels", lambda: {"nvidia-dali-cuda130": "2.4.0"})
    stub(monkeypatch, "triton", "bf16", "fp16")
    code, out, err = run(capsys, "eval", "--workdir", ws, "--device", "cpu", "--json")
    assert code == 0, err
    assert warnings(err) == [
        "warning: DALI GPU decoding unavailable (nvidia-dali-cuda130 needs a CUDA 13 driver, "
        "this one is 12.4): using DALI CPU; pip uninstall -y nvidia-dali-cuda130 && "
        "pip install nvidia-dali-cuda120 to decode on the GPU"]
    measured = [r for r in json.loads(out)["rows"] if r.get("pipeline")]
    assert measured and all(r["pipeline"] == "dali-cpu" and r["precision"] == "bf16"
                            for r in measured)
    code, out, err = run(capsys, "eval", "--workdir", ws, "--device", "cpu", "--json")
    assert code == 0 and len(warnings(err)) == 1 and len(checks) == 1
    code, _, err = distill(capsys, ws, "--pipeline", "dali", "--loss-backend", "torch")
    (line,) = errors(err)
    assert code == 2 and "needs a CUDA 13 driver, this one is 12.4" in line
    # mlfd info names both
    code, out, _ = run(capsys, "info", "--json")
    doc = json.loads(out)
    assert (doc["dali_cuda"], doc["driver_cuda"], doc["default_pipeline"]) == (13, "12.4",
                                                                             "dali-cpu")


def test_without_native_bf16_training_uses_fp16_with_a_grad_scaler(ws, capsys, monkeypatch,
                                                                  cuda_like, checks):
    monkeypatch.setattr(fastchecks, "bf16_native", lambda device: False)
    stub(monkeypatch, "triton", "dali_cpu")
    steps = []
    real_step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step",
                        lambda self, *a, **k: steps.append(self) or real_step(self, *a, **k))
    code, _, err = distill(capsys, ws, "--pipeline", "torch", "--loss-backend", "torch")
    assert code == 0, err
    assert warnings(err) == [
        f"warning: bf16 autocast unavailable ({fastpaths.device_name(CPU)} has no native bf16): "
        "using fp16 autocast with a GradScaler; --precision fp16 chooses fp16 without this "
        "warning"]
    meta, rows = recorded(ws)
    assert meta["precision"] == "fp16" and all(r["precision"] == "fp16" for r in rows)
    assert steps, "fp16 training steps through a GradScaler"
    code, _, err = distill(capsys, ws, "--pipeline", "torch", "--loss-backend", "torch")
    assert code == 0 and len(warnings(err)) == 1 and len(checks) == 1
    code, _, err = distill(capsys, ws, "--pipeline", "torch", "--precision", "bf16")
    (line,) = errors(err)
    assert code == 2 and line.startswith("error: --precision bf16: bf16 autocast unavailable")


def test_a_dry_run_neither_checks_nor_caches(ws, capsys, monkeypatch, cuda_like, checks, cache):
    code, _, err = distill(capsys, ws, "--dry-run", "--loss-backend", "triton")
    assert code == 0, err
    assert checks == [] and not cache.exists()


def test_precision_option_is_validated(capsys, tmp_path):
    code, _, err = run(capsys, "fuse", "--workdir", tmp_path / "w", "--precision", "fp8")
    (line,) = errors(err)
    assert code == 2 and "unknown --precision 'fp8'" in line


# ---- DALI wheels and the install -------------------------------------------------------------

class _Dist:
    def __init__(self, name, version):
        self.metadata, self.version = {"Name": name}, version


def test_two_dali_wheels_are_found_and_reported(monkeypatch, capsys):
    monkeypatch.setattr(environment.metadata, "distributions", lambda: [
        _Dist("nvidia-dali-cuda130", "2.4.0"), _Dist("numpy", "2.0"),
        _Dist("nvidia_dali_cuda120", "2.4.0")])
    assert fastpaths.dali_wheels() == {"nvidia-dali-cuda120": "2.4.0",
                                       "nvidia-dali-cuda130": "2.4.0"}
    monkeypatch.setattr(environment, "driver_cuda_version", lambda: (12, 8))
    row = fastchecks.probe_dali_driver(CPU, {})
    assert row["status"] == "failed" and "two DALI wheels" in row["detail"]
    assert row["fix"] == "pip uninstall -y nvidia-dali-cuda130 (keep nvidia-dali-cuda120)"
    code, out, _ = run(capsys, "info", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["dali_cuda"] == [12, 13] and "2 DALI wheels" in doc["dali_problem"]


def test_pyproject_admits_current_releases_and_fits_the_driver():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {Requirement(d).name: Requirement(d) for d in proj["dependencies"]}
    for name, version in [("torch", "2.15.0"), ("torchvision", "0.29.2"),
                          ("torchvision", "0.30.0"), ("triton", "3.9.0"), ("zarr", "3.4.0"),
                          ("numcodecs", "0.17.0")]:
        assert deps[name].specifier.contains(version), (name, version)
    assert "platformdirs" in deps
    assert not [d for d in deps if d.startswith("nvidia-dali")]  # the driver decides: extras
    extras = {k: [Requirement(r) for r in v] for k, v in proj["optional-dependencies"].items()}
    assert [r.name for r in extras["cuda12"]] == ["nvidia-dali-cuda120"]
    assert [r.name for r in extras["cuda13"]] == ["nvidia-dali-cuda130"]
    assert any(r.name == "mlfd" and r.extras == {"cuda13"} for r in extras["dev"])
