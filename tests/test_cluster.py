"""Studies spread over a Ray cluster (``--ray``): the same files as one process, nothing lost when a worker dies.

A local Ray instance with 2 CPUs and two single-threaded replicas of the tiny F32 model. Every comparison is
byte for byte against the single-process run of the same settings.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.cluster import pool
from pyrefusal.cluster.pool import FAULT_ENV, ClusterError, ClusterSpec, RayShards, require_ray
from pyrefusal.errors import ModelError
from pyrefusal.settings import RunSettings
from pyrefusal.studies.run import run_pipeline

ray = pytest.importorskip("ray")

CONDITIONS = "baseline,ablation,actadd,induce,harm_ablation,random_ablation"
SAME = ("candidates.npz", "direction.npy", "selection.json", "completions.jsonl", "prompts.json", "metrics.json")


def _args(model: Path, data: Path, out: Path) -> list[str]:
    # --n-seq 2: several extraction units and 36 generation units, so two replicas share the work
    return [
        "run", "--model", str(model), "--data-dir", str(data), "--threads", "1", "--target-langs", "en,de",
        "--n-train", "6", "--n-val", "4", "--n-test", "3", "--max-new-tokens", "6", "--kl-threshold", "1e9",
        "--n-seq", "2", "--refusal-openings", "I", "--conditions", CONDITIONS, "--out", str(out),
    ]  # fmt: skip


def _invoke(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


def _results(out: Path) -> dict[str, Any]:
    data = json.loads((out / "results.json").read_text())
    machine = {"timings", "timings_previous", "versions", "config", "model", "data_source"}
    return {k: v for k, v in data.items() if k not in machine}


def _config(model: Path, data: Path) -> RunSettings:
    return RunSettings(
        model=str(model),
        data_dir=str(data),
        n_threads=1,
        target_langs=("en", "de"),
        n_train=6,
        n_val=4,
        n_test=3,
        max_new_tokens=6,
        kl_threshold=1e9,
        n_seq_max=2,
        refusal_openings=("I",),
        conditions=tuple(CONDITIONS.split(",")),
    )


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_model, polyrefuse_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _invoke(_args(tiny_model[0], polyrefuse_dir, out))
    return out


def _same_run(a: Path, b: Path) -> None:
    for name in SAME:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _results(a) == _results(b)


def test_sharded_run_equals_single_process(local_ray, single, tiny_model, polyrefuse_dir, tmp_path) -> None:
    out = tmp_path / "sharded"
    log = _invoke([*_args(tiny_model[0], polyrefuse_dir, out), "--ray", "--ray-workers", "2"])
    assert "ray: 2 model replica(s)" in log
    assert "ray: generation: 36 units" in log  # 2 languages x 6 conditions x 3 batches of 2 prompts
    assert "ray: first-token refusal: 12 units" in log and "ray: capability: 5 units" in log
    _same_run(single, out)
    # the sharded directory resumes without Ray, and reports the same
    assert "reusing candidates.npz" in _invoke(_args(tiny_model[0], polyrefuse_dir, out))
    _same_run(single, out)


def test_worker_killed_mid_generation(local_ray, single, tiny_model, polyrefuse_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pool, "SHARE_BYTES", 0)  # every array argument through the object store, sent once
    monkeypatch.setattr(pool, "STATUS_SECONDS", 0.0)  # a status line after every unit
    out = tmp_path / "faulted"
    marker = tmp_path / "fault-fired"
    logs: list[str] = []
    spec = ClusterSpec(workers=2, threads=1, env={FAULT_ENV: f"generation:3:{marker}"})
    run_pipeline(_config(tiny_model[0], polyrefuse_dir), out, cluster=spec, log=logs.append)
    assert marker.exists(), "the fault drill did not fire"
    assert any("worker died during generation unit 3" in line for line in logs)
    assert any(re.match(r"ray: generation: \d+/36 units, \d+ tokens/s, ETA \d+s \(2 replicas\)", x) for x in logs)
    keys = Counter(
        (r["prompt_id"], r["lang"], r["condition"])
        for r in map(json.loads, (out / "completions.jsonl").read_text().splitlines())
    )
    assert len(keys) == 72 and set(keys.values()) == {1}  # each prompt x language x condition exactly once
    _same_run(single, out)


def test_driver_killed_resumes(local_ray, single, tiny_model, polyrefuse_dir, tmp_path) -> None:
    def interrupted(name: str) -> Path:  # as if the driver died during generation: part of completions.jsonl
        out = tmp_path / name
        shutil.copytree(single, out)
        lines = (out / "completions.jsonl").read_text().splitlines(keepends=True)
        (out / "completions.jsonl").write_text("".join(lines[:20]))
        for f in ("results.json", "report.md", "metrics.json"):
            (out / f).unlink()
        return out

    out = interrupted("resumed-ray")
    log = _invoke([*_args(tiny_model[0], polyrefuse_dir, out), "--ray", "--ray-workers", "2"])
    assert "ray: generation: 26 units" in log  # the 52 missing completions, in batches of 2
    # the same directory as a single-process resume (metrics.json records the steering path of the conditions
    # generated in the last session only, with or without Ray)
    plain = interrupted("resumed")
    _invoke(_args(tiny_model[0], polyrefuse_dir, plain))
    _same_run(plain, out)
    for name in SAME[:-1]:
        assert (single / name).read_bytes() == (out / name).read_bytes(), name


def test_judge_and_back_translation_on_replicas(local_ray, single, tiny_model, polyrefuse_dir, tmp_path) -> None:
    """--judge on a sharded run: back-translation on the study's replicas (--judge-translator self) or on replicas
    of a translation model, verdicts on replicas of the guard model; the caches and rates equal one process's."""
    model = str(tiny_model[0])
    copy = tiny_model[0].parent / "translator-copy.gguf"  # another translator spec: replicas of their own
    if not copy.exists():
        shutil.copyfile(tiny_model[0], copy)
    for translator in ("self", str(copy)):
        judge = ["--judge", "wildguard", "--judge-model", model, "--judge-translator", translator]
        dirs = {}
        for name, extra in (("one", []), ("ray", ["--ray", "--ray-workers", "2"])):
            out = dirs[name] = tmp_path / f"{name}-{Path(translator).stem}"
            shutil.copytree(single, out)
            log = _invoke([*_args(tiny_model[0], polyrefuse_dir, out), *judge, *extra])
        # 14 distinct German harmful responses (6 conditions x 3 prompts), in the translator's batches of 2; the
        # guard's batches of 16 of the 29 distinct (English prompt, English text) pairs
        assert "ray: back-translation: 7 units on 2 replica(s)" in log and "ray: judge: 2 units on 2" in log
        assert "ray: 2 model replica(s) of pyrefusal-tiny" in log
        if translator != "self":
            assert log.count("ray: 2 model replica(s) of ") == 2  # the translator's, then the guard's
        for name in ("back_translations.jsonl", "judge_cache.jsonl", *SAME):
            assert (dirs["one"] / name).read_bytes() == (dirs["ray"] / name).read_bytes(), name
        judged = _results(dirs["ray"])["evaluation"]["de"]["baseline"]["judge"]
        assert judged["n"] == 3 and judged["back_translation"]["translated"] == 3
        assert _results(dirs["one"]) == _results(dirs["ray"])
        # judged again with Ray: everything comes from the caches
        log = _invoke([*_args(tiny_model[0], polyrefuse_dir, dirs["ray"]), *judge, "--ray", "--ray-workers", "2"])
        assert ": 0 new" in log and "ray: judge: " not in log


def test_cluster_errors_say_what_to_do(local_ray, tiny_model, polyrefuse_dir, monkeypatch) -> None:
    config = _config(tiny_model[0], polyrefuse_dir)
    with pytest.raises(ClusterError, match="asks for a GPU, but the Ray cluster has none"):
        RayShards(RunSettings(**{**config.to_dict(), "n_gpu_layers": 4}), ClusterSpec(workers=1))
    with pytest.raises(ClusterError, match="different files under the same name"):
        RayShards(config, ClusterSpec(workers=1), sha256="0" * 64)
    # the model missing on a worker's node: pyrefusal's own message, not Ray's traceback
    missing = RunSettings(**{**config.to_dict(), "model": str(tiny_model[0].parent / "elsewhere.gguf")})
    with pytest.raises(ModelError, match="Model file not found"):
        RayShards(missing, ClusterSpec(workers=1))
    # more replicas than the cluster can place: a clear error after the timeout, and nothing left holding CPUs
    with pytest.raises(ClusterError, match="was not ready after 5s"):
        RayShards(config, ClusterSpec(workers=3, threads=1, ready_timeout=5))
    for _ in range(100):  # ray.kill releases the actors' CPUs asynchronously
        if ray.available_resources().get("CPU", 0) == 2:
            break
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2
    r = CliRunner().invoke(main, ["run", "--ray-workers", "2"])
    assert r.exit_code == 2 and "--ray-workers needs --ray" in r.output

    import builtins

    real_import = builtins.__import__

    def no_ray(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ClusterError, match=r"pip install 'pyrefusal\[ray\]'"):
        require_ray()


def _tree(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern)) if p.is_file()}


def test_sharded_transfer_equals_single_process(local_ray, tiny_model, polyrefuse_dir, tmp_path) -> None:
    args = [
        "transfer", "--model", str(tiny_model[0]), "--data-dir", str(polyrefuse_dir), "--threads", "1",
        "--sources", "en,de", "--targets", "en,de", "--n-train", "6", "--n-val", "4", "--n-test", "2",
        "--max-new-tokens", "3", "--kl-threshold", "1e9",
    ]  # fmt: skip
    _invoke([*args, "--out", str(tmp_path / "a")])
    log = _invoke([*args, "--out", str(tmp_path / "b"), "--ray", "--ray-workers", "2"])
    assert "ray: transfer generation:" in log
    a, b = tmp_path / "a", tmp_path / "b"
    assert _tree(a / "directions", "*") == _tree(b / "directions", "*")  # candidates, selections, activations
    assert (a / "completions.jsonl").read_bytes() == (b / "completions.jsonl").read_bytes()
    ta, tb = (json.loads((d / "transfer.json").read_text()) for d in (a, b))
    for key in ("transfer", "directions", "geometry"):
        assert ta[key] == tb[key], key


def test_quant_sweep_variants_as_parallel_jobs(local_ray, tiny_model, polyrefuse_dir, tmp_path) -> None:
    def args(name: str) -> list[str]:
        return [
            "quant-sweep", "--model", str(tiny_model[0]), "--data-dir", str(polyrefuse_dir), "--threads", "1",
            "--types", "f32,q8_0", "--n-train", "4", "--n-val", "4", "--n-test", "3", "--max-new-tokens", "4",
            "--positions=-1", "--work-dir", str(tmp_path / f"work-{name}"), "--out", str(tmp_path / name),
        ]  # fmt: skip

    _invoke(args("a"))
    log = _invoke([*args("b"), "--ray"])
    assert "ray: 2 variant job(s), 2 at a time" in log and "ray: 2 cross-application job(s), 2 at a time" in log
    a, b = tmp_path / "a", tmp_path / "b"
    assert _tree(a / "completions", "*.jsonl") == _tree(b / "completions", "*.jsonl")
    assert _tree(a / "variants", "*.npy") == _tree(b / "variants", "*.npy")
    assert _tree(a / "variants", "*.selection.json") == _tree(b / "variants", "*.selection.json")
    for name in ("F32", "Q8_0"):
        va, vb = (json.loads((d / "variants" / f"{name}.json").read_text()) for d in (a, b))
        for v in (va, vb):
            v.pop("seconds"), v.pop("path")
        assert va == vb
    qa, qb = (json.loads((d / "quant_sweep.json").read_text()) for d in (a, b))
    assert qa["refusal"] == qb["refusal"] and qa["geometry"] == qb["geometry"]
    # the sweep directory resumes without Ray: nothing is made again
    assert "reusing" in _invoke(args("b")).replace(str(tmp_path / "work-b"), "")


def test_optimize_scores_trials_on_replicas_as_one_process_does(local_ray, single, tmp_path) -> None:
    pytest.importorskip("optuna")
    from pyrefusal.settings import OptimizeSettings
    from pyrefusal.studies.optimize import run_optimize

    settings = OptimizeSettings(
        trials=4, n_val=2, max_new_tokens=3, kl_threshold=1e9, n_confirm=1, n_ctx=2048, n_seq_max=8, n_threads=1
    )
    runs = {}
    for name, cluster in (("one", None), ("ray", ClusterSpec(workers=2, threads=1))):
        run_dir = tmp_path / name
        shutil.copytree(single, run_dir)
        logs: list[str] = []
        run_optimize(settings, run_dir / "optimize", run_dir=run_dir, cluster=cluster, log=logs.append)
        runs[name] = [json.loads(x) for x in (run_dir / "optimize" / "trials.jsonl").read_text().splitlines()]
    assert any("ray: optimize trials: 2 units on 2 replica(s)" in x for x in logs)  # two rounds of two trials
    one, sharded = runs["one"], runs["ray"]
    assert [r["state"] for r in sharded] == ["COMPLETE"] * 4
    # the seeded start-up trials are drawn in the same order, and a replica scores them as the driver does
    n_startup = 3
    for a, b in zip(one[:n_startup], sharded[:n_startup], strict=True):
        assert a["params"] == b["params"]
        assert (a["refusal"], a["kl"], a["per_language"]) == (b["refusal"], b["kl"], b["per_language"])
