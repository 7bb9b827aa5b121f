"""The equal-footing comparison on the suite: both methods at the same training box, one at a time.

For each dataset of a suite (``bench/suite/build.py``), each training box and each method, in turn (never
two trainings at once): train, keep every epoch's weights and latents, then score every epoch
(:mod:`bench.suite.scoring`). cryoDRGN trains on the stack Fourier-cropped to the training box
(``cryodrgn downsample``; ``ctf.pkl`` D and Apix rewritten, ``pose.pkl`` unchanged since its translations
are fractions of the box), and its maps are Fourier-padded to the data's box for scoring; cryoFormer
trains with ``train_box`` and renders its maps at the data's box itself. Results merge into one JSON per
tag, so one method or one dataset can be run (or rerun) at a time.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from bench import bench_vs_cryodrgn as vs
from bench.suite.dataset import LoadedTruth
from bench.suite.scoring import epoch_scores, fourier_resample, state_mean_latents


def cryodrgn_data(exe: str, data: Path, box: int, work: Path, threads: int) -> Path:
    """A folder with ``particles.mrcs``, ``pose.pkl`` and ``ctf.pkl`` at training box ``box``."""
    out = work / f"cryodrgn_data_D{box}"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "pose.pkl", out / "pose.pkl")
    with open(data / "ctf.pkl", "rb") as fh:
        ctf = np.asarray(pickle.load(fh), np.float32)
    d0 = int(ctf[0, 0])
    if box == d0:
        shutil.copy(data / "particles.mrcs", out / "particles.mrcs")
    else:
        subprocess.run([exe, "downsample", str(data / "particles.mrcs"), "-D", str(box), "-o",
                        str(out / "particles.mrcs")], check=True, env=vs.child_env(threads, extra_path=False),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctf[:, 1] *= d0 / box
        ctf[:, 0] = box
    with open(out / "ctf.pkl", "wb") as fh:
        pickle.dump(ctf, fh)
    return out


def cryodrgn_maps(exe: str, ck: dict, zs: np.ndarray, work: Path, box: int, threads: int) -> np.ndarray:
    """``cryodrgn eval_vol`` at ``zs``, Fourier-padded to ``box``."""
    import mrcfile

    work.mkdir(parents=True, exist_ok=True)
    np.savetxt(work / "z.txt", zs)
    vdir = work / "vols"
    shutil.rmtree(vdir, ignore_errors=True)
    subprocess.run([exe, "eval_vol", ck["weights"], "-c", str(Path(ck["weights"]).parent / "config.yaml"),
                    "--zfile", str(work / "z.txt"), "-o", str(vdir)], check=True,
                   env=vs.child_env(threads, extra_path=False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = sorted(vdir.glob("*.mrc"))
    if len(files) != len(zs):
        raise RuntimeError(f"eval_vol wrote {len(files)} maps for {len(zs)} latents in {vdir}")
    return np.stack([fourier_resample(mrcfile.read(f).astype(np.float32), box) for f in files])


def epoch_outputs(method: str, ck: dict, truth: LoadedTruth, data: Path, idx: np.ndarray, work: Path,
                  exe: str | None, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(all latents, maps at ``idx``'s latents, maps at each state's mean latent, those states)."""
    box, n_states = truth.record.box, len(truth.state_maps)
    if method == "cryodrgn":
        with open(ck["z"], "rb") as fh:
            z = np.asarray(pickle.load(fh), np.float32)
        zs, present = state_mean_latents(z, truth.states, n_states)
        vols = cryodrgn_maps(exe, ck, np.concatenate([z[idx], zs]), work, box, threads)
        return z, vols[:len(idx)], vols[len(idx):], present
    from cryoformer.infer import Reconstruction
    from cryoformer_ext.formats.star import read_particles_star

    rec = Reconstruction.load(ck["weights"])
    z = rec.encode(read_particles_star(data / "particles.star", data).data)
    zs, present = state_mean_latents(z, truth.states, n_states)
    return z, rec.volumes(z[idx], box), rec.volumes(zs, box), present


def train_method(method: str, a, data: Path, train_box: int, work: Path, exe: str | None) -> dict:
    out = work / method
    if method == "cryodrgn":
        cdata = cryodrgn_data(exe, data, train_box, work, a.threads)
        return vs.train_cryodrgn(exe, cdata, out, a.epochs, a.threads, a.batch, a.seed, a.timeout)
    job = {**json.loads(a.cf_job), "train_box": train_box}
    run = vs.train_cryoformer(data, out, a.cf_epochs or a.epochs, a.threads, a.batch, a.seed, a.timeout,
                              json.dumps(job))
    run["job"] = json.dumps(job)
    return run


def run_one(method: str, a, data: Path, train_box: int, work: Path, exe: str | None) -> dict:
    """Train one method on one dataset at one training box and score every epoch."""
    truth = LoadedTruth(data)
    idx = np.unique(np.linspace(0, truth.record.n - 1, a.eval_particles).round().astype(int))
    run = train_method(method, a, data, train_box, work, exe)
    cks = run.pop("checkpoints")
    outs = [epoch_outputs(method, ck, truth, data, idx, work / f"eval_{e}", exe, a.threads)
            for e, ck in enumerate(cks, 1)]
    tf, orient = vs.choose_transform(outs[-1][1][0], truth.particle_map(int(idx[0])))
    epochs, cum = [], 0.0
    for e, (z, vols, state_vols, present) in enumerate(outs, 1):
        es = run["epoch_s"][e - 1] if e - 1 < len(run["epoch_s"]) else float("nan")
        cum += es
        epochs.append({"epoch": e, "epoch_s": es, "cum_train_s": cum, "images_per_s": truth.record.n / es,
                       **epoch_scores(z, vols, state_vols, present, truth, idx, tf)})
        print(method, truth.record.key, f"D{train_box}", json.dumps(epochs[-1]), flush=True)
    return {**run, "method": method, "dataset": truth.record.key, "train_box": train_box,
            "orientation": orient, "epochs": epochs, "truth": truth.record.model_dump()}


def run_suite(a) -> None:
    """Every (dataset, training box, method) of the request in turn, merged into the tag's results."""
    from bench.suite.report import merge_runs, write_suite_report

    manifest_path = a.suite / "suite.json"
    if not manifest_path.exists():
        raise SystemExit(f"{manifest_path} not found: build the suite with bench/suite/build.py --out {a.suite}")
    keys = [d["key"] for d in json.loads(manifest_path.read_text())["datasets"]]
    if a.datasets:
        keys = [k for k in keys if any(k.startswith(p) for p in a.datasets.split(","))]
    methods = [m.strip() for m in a.methods.split(",")]
    bad = [m for m in methods if m not in ("cryodrgn", "cryoformer")]
    if bad:
        raise SystemExit(f"--methods: unknown {bad} (cryodrgn, cryoformer)")
    data_box = json.loads((a.suite / keys[0] / "truth" / "truth.json").read_text())["box"] if keys else 0
    if any(tb > data_box or tb % 2 for tb in a.train_box):
        raise SystemExit(f"--train-box {a.train_box}: each must be even and at most the data's box {data_box} "
                         f"({a.suite / 'suite.json'})")
    exe = None
    if "cryodrgn" in methods:
        if not a.skip_install:
            vs.install_cryodrgn(a.venv, a.torch, a.isolated_venv)
        exe = vs.cryodrgn_exe(a.venv)
    for key in keys:
        for tb in a.train_box:
            for method in methods:
                work = a.work / key / f"D{tb}" / method
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                t0 = time.time()
                run = run_one(method, a, a.suite / key, tb, work, exe)
                run.update({"threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "scoring_s": time.time() - t0 - run.get("wall_s", 0.0)})
                merge_runs(a.results / f"suite_{a.tag}.json", run, a.command)
                if not a.keep_work:
                    shutil.rmtree(work, ignore_errors=True)
    write_suite_report(a.results / f"suite_{a.tag}.json")
