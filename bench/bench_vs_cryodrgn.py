"""Side by side with cryoDRGN on the same simulated heterogeneous data: quality against wall time.

Data: the project's simulator (:func:`cryoformer.simulate.simulate`), ``--states`` evenly spaced
conformations of the hinge motion (or ``continuous``), SNR ``--snr``, poses and CTF given, written as a
RELION 3.1 STAR + MRCS (:func:`cryoformer_ext.formats.simulation.write_simulated`) for cryoFormer and as
cryoDRGN's ``pose.pkl`` ((rot (N,3,3), trans = shift_px / D)) and ``ctf.pkl`` ((N, 9): D, Apix, dfU, dfV,
dfAng, kV, Cs, Q0, phase) next to the same MRCS for cryoDRGN.

Training, one method at a time (each in its own process, ``--threads`` torch threads, peak RSS from
``/proc/<pid>/status`` VmHWM polled by this script):
* cryoDRGN: ``cryodrgn train_vae`` (zdim 8, encoder/decoder 3 x 256, ``--poses --ctf``, default data
  sign inversion: cryoDRGN's CTF is the negative of RELION's, so its default ``invert_data`` is right for
  RELION-convention images; with ``--uninvert-data`` its maps came out contrast-inverted, FSC-AUC < 0,
  ``--checkpoint 1`` so every epoch leaves ``weights.E.pkl`` + ``z.E.pkl``); epoch times from its
  "Epoch: ... Finished in" lines.
* cryoFormer: the ``cryoformer train`` path (``read_particles_star`` + the trainer of ``run_job``, same
  job defaults), the epoch checkpoint copied after every epoch; epoch times from its "epoch E done" lines.
Per-epoch checkpoints in one process (rather than restarting with ``--load`` / resume per epoch) keep
process start-up out of the epoch times; the wall-time axis is the cumulative epoch time.

Quality after every epoch, from that epoch's weights and the latents of every particle:
* maps: for ``--eval-particles`` evenly spaced particles, the map at that particle's latent (cryoDRGN:
  ``cryodrgn eval_vol --zfile``; cryoFormer: ``Reconstruction.load(ckpt).volumes(z)``), FSC against
  ``true_volume(t_i, D)`` of its conformation: mean FSC-AUC and resolution at FSC 0.5 / 0.143 (CryoBench);
* the moving region (discrete states): the map at the mean latent of each true state, correlated with
  that state's truth over the voxels where the true conformations differ (their standard deviation above
  10 % of its maximum); whole-box FSC is dominated by the static core and barely tells a resolved motion
  from a consensus map (:mod:`cryoformer_ext.analysis.recovery`);
* latents: |Spearman| of PC1 with the true conformation, cross-validated R^2 of a linear map z -> t, and
  kNN accuracy of the state (10 neighbours, 5-fold).
Map axis order/handedness conventions may differ between programs: the signed axis permutation (48
candidates) that best matches the truth is chosen once per method on the last epoch's first map.
Wall time: cumulative epoch time (training only, like cryoDRGN's own epoch timer); for each score the
results give each method's wall time to its best value, and to the other method's best value.

Writes ``bench/results/vs_cryodrgn_D<box>_N<n>_snr<snr>.json`` / ``.md`` / ``.png`` (``vs_cryodrgn_quick.*``).

    python bench/bench_vs_cryodrgn.py --quick                 # smoke run: box 32, 500 particles, 2 epochs
    python bench/bench_vs_cryodrgn.py --box 64 --n 5000 --epochs 20 --snr 0.1 --threads 2
    python bench/bench_vs_cryodrgn.py --box 64 --n 5000 --epochs 20 --snr 0.05 --threads 2 --skip-install
    python bench/bench_vs_cryodrgn.py --box 128 --n 5000 --epochs 20

``--suite DIR`` runs the equal-footing comparison on a suite of heterogeneity kinds built by
``bench/suite/build.py`` instead: both methods at the same training box (``--train-box 32 64``), one after
the other (:mod:`bench.suite.harness`), results in ``bench/results/suite_<tag>.*``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VENV = Path(__file__).resolve().parent / ".venv-cryodrgn"
CRYODRGN_VERSION = "4.3.1"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "cryoformer_vs_cryodrgn"


# ---------------------------------------------------------------------------------------------------
# environment


def install_cryodrgn(venv: Path, torch_version: str, isolated: bool) -> None:
    """``python -m venv`` + ``pip install torch==X cryodrgn``. Without ``isolated`` the venv sees this
    interpreter's packages (the local CPU torch satisfies ``torch==X``; nothing is downloaded twice)."""
    if not (venv / "bin" / "python").exists():
        cmd = [sys.executable, "-m", "venv", str(venv)] + ([] if isolated else ["--system-site-packages"])
        subprocess.run(cmd, check=True)
    (venv / ".gitignore").write_text("*\n")  # keep the venv out of git
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch_req = [f"torch=={torch_version}"]
    if isolated:
        torch_req += ["--index-url", "https://download.pytorch.org/whl/cpu"]
    subprocess.run(pip + torch_req, check=True)
    subprocess.run(pip + [f"cryodrgn=={CRYODRGN_VERSION}"], check=True)


def cryodrgn_exe(venv: Path) -> str:
    exe = venv / "bin" / "cryodrgn"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run without --skip-install first")
    return str(exe)


# ---------------------------------------------------------------------------------------------------
# data


def make_dataset(out: Path, n: int, box: int, states: str, snr: float, seed: int) -> dict:
    from cryoformer.simulate import simulate
    from cryoformer_ext.formats.simulation import write_simulated

    out.mkdir(parents=True, exist_ok=True)
    pixel = 4.0 * 64 / box  # same physical box (256 Å) at every D
    st = states if states == "continuous" else int(states)
    t0 = time.perf_counter()
    sim = simulate(n, box, pixel_size_A=pixel, snr=snr, states=st, seed=seed)
    write_simulated(sim, out)
    with open(out / "pose.pkl", "wb") as fh:
        pickle.dump((sim.rot.astype(np.float32), (sim.shift_px / box).astype(np.float32)), fh)
    c = sim.ctf
    ctf = np.stack([np.full(n, box), np.full(n, pixel), c.defocus_u_A, c.defocus_v_A, c.defocus_angle_deg,
                    c.voltage_kv, c.cs_mm, c.amp_contrast, c.phase_shift_deg], axis=1).astype(np.float32)
    with open(out / "ctf.pkl", "wb") as fh:
        pickle.dump(ctf, fh)
    np.save(out / "conformation.npy", sim.conformation)
    return {"n": n, "box": box, "pixel_size_A": pixel, "states": states, "snr": snr,
            "noise_sigma": sim.noise_sigma, "simulate_and_write_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------
# running with peak-RSS polling


def run_polled(cmd: list[str], log_path: Path, env: dict, timeout: float) -> dict:
    t0 = time.time()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        hwm = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as st:
                    for line in st:
                        if line.startswith("VmHWM"):
                            hwm = max(hwm, int(line.split()[1]))
            except OSError:
                pass
            if time.time() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"{cmd[:3]} ran past {timeout} s (log: {log_path})")
            time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}); log: {log_path}\n"
                           + log_path.read_text()[-3000:])
    return {"wall_s": time.time() - t0, "peak_rss_GB": hwm / 1024 ** 2}


def child_env(threads: int, extra_path: bool = True) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if extra_path:
        env["PYTHONPATH"] = str(REPO)
    return env


def _hms(s: str) -> float:
    h, m, sec = s.split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def train_cryodrgn(exe: str, data: Path, out: Path, epochs: int, threads: int, batch: int, seed: int,
                   timeout: float) -> dict:
    cmd = [exe, "train_vae", str(data / "particles.mrcs"), "--poses", str(data / "pose.pkl"),
           "--ctf", str(data / "ctf.pkl"), "--zdim", "8", "-n", str(epochs), "-o", str(out),
           "--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3",
           "--checkpoint", "1", "--no-analysis", "-b", str(batch), "--seed", str(seed),
           "--max-threads", str(threads)]
    run = run_polled(cmd, out.with_suffix(".log"), child_env(threads, extra_path=False), timeout)
    text = out.with_suffix(".log").read_text()
    run["epoch_s"] = [_hms(m) for m in re.findall(r"Epoch: \d+ .*?Finished in (\d+:\d+:[\d.]+)", text)]
    ws = sorted(out.glob("weights.*.pkl"), key=lambda p: int(p.name.split(".")[1]))
    run["checkpoints"] = [{"weights": str(w), "z": str(w.with_name(w.name.replace("weights", "z")))} for w in ws]
    run["command"] = " ".join(cmd)
    return run


def train_cryoformer(data: Path, out: Path, epochs: int, threads: int, batch: int, seed: int,
                     timeout: float, job_json: str) -> dict:
    cmd = [sys.executable, __file__, "--child-cryoformer", str(data), str(out), "--epochs", str(epochs),
           "--threads", str(threads), "--batch", str(batch), "--seed", str(seed), "--cf-job", job_json]
    run = run_polled(cmd, out.with_suffix(".log"), child_env(threads), timeout)
    text = out.with_suffix(".log").read_text()
    run["epoch_s"] = [float(m) for m in re.findall(r"epoch \d+ done: .*? in ([\d.]+) s", text)]
    run["checkpoints"] = [{"weights": str(p)} for p in sorted(out.glob("epoch_*.pt"))]
    run["occupancy_log"] = re.findall(r"occupancy grid estimated .*", text)
    run["command"] = " ".join(cmd)
    return run


def child_cryoformer(data: Path, out: Path, epochs: int, threads: int, batch: int, seed: int, job_json: str) -> None:
    """``cryoformer train``'s training part (job defaults + ``--cf-job`` overrides), copying the checkpoint
    after every epoch."""
    import torch

    torch.set_num_threads(threads)
    from cryoformer.train import CHECKPOINT_NAME, estimate_data_scale, train
    from cryoformer_ext.config import JobConfig
    from cryoformer_ext.job.configs import model_config_for, train_config_for, training_box
    from cryoformer_ext.formats.star import read_particles_star

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    star = read_particles_star(data / "particles.star", data)
    job = JobConfig(**{"epochs": epochs, "batch_size": batch, "seed": seed, "threads": threads, **json.loads(job_json)})
    scale = estimate_data_scale(star.data, training_box(job, star.data.box), seed=seed)
    mcfg = model_config_for(star.data, job, scale)
    tcfg = train_config_for(job, len(star.data), "cpu")
    print(f"job parameters: {job.model_dump_json()}", flush=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        m = re.match(r"epoch (\d+) done", msg)
        if m:
            shutil.copy(out / "checkpoints" / CHECKPOINT_NAME, out / f"epoch_{int(m.group(1)):03d}.pt")

    train(star.data, mcfg, tcfg, out / "checkpoints", log=log)


# ---------------------------------------------------------------------------------------------------
# quality


def _signed_perms() -> list[tuple[tuple[int, int, int], tuple[bool, bool, bool]]]:
    return [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product([False, True], repeat=3)]


def _apply(vol: np.ndarray, tf) -> np.ndarray:
    perm, flips = tf
    v = np.transpose(vol, perm)
    for ax, fl in enumerate(flips):
        if fl:
            v = np.roll(np.flip(v, ax), 1, ax)  # flip about the centre voxel D//2
    return v


def choose_transform(vol: np.ndarray, truth: np.ndarray):
    from cryoformer.metrics import fsc, fsc_auc

    scores = [(fsc_auc(fsc(_apply(vol, tf), truth)), tf) for tf in _signed_perms()]
    best = max(scores, key=lambda s: s[0])
    ident = next(s for s in scores if s[1] == ((0, 1, 2), (False, False, False)))
    return best[1], {"transform": {"perm": list(best[1][0]), "flip": list(best[1][1])},
                     "auc_best": best[0], "auc_identity": ident[0]}


def map_quality(vols: np.ndarray, ts: np.ndarray, box: int, tf) -> dict:
    from cryoformer.metrics import fsc, fsc_auc, resolution_px
    from cryoformer.simulate import true_volume

    cache: dict[float, np.ndarray] = {}
    aucs, r05, r0143 = [], [], []
    for v, t in zip(vols, ts):
        key = round(float(t), 6)
        if key not in cache:
            cache[key] = true_volume(float(t), box)
        curve = fsc(_apply(v, tf), cache[key])
        aucs.append(fsc_auc(curve))
        r05.append(resolution_px(curve, 0.5))
        r0143.append(resolution_px(curve, 0.143))
    return {"fsc_auc": float(np.mean(aucs)), "res_px_fsc0.5": float(np.mean(r05)),
            "res_px_fsc0.143": float(np.mean(r0143))}


def state_quality(state_vols: np.ndarray, state_values: np.ndarray, box: int, tf) -> dict:
    """Moving-region correlation of the maps at the mean latent of each true state."""
    from cryoformer.simulate import true_volume
    from cryoformer_ext.analysis.recovery import masked_corr, moving_region

    truths = [true_volume(float(s), box) for s in state_values]
    move = moving_region(truths)
    own, best = [], []
    for i, v in enumerate(state_vols):
        corr = [masked_corr(_apply(v, tf), tv, move) for tv in truths]
        own.append(corr[i])
        best.append(int(np.argmax(corr)))
    return {"moving_corr": float(np.mean(own)), "moving_corr_per_state": [round(c, 4) for c in own],
            "states_recovered": int(sum(b == i for i, b in enumerate(best)))}


def latent_quality(z: np.ndarray, conf: np.ndarray, states: np.ndarray | None) -> dict:
    from cryoformer_ext.analysis.recovery import latent_scores

    sc = latent_scores(z, conf, states)
    return {"spearman_pc1": sc.spearman_pc1, "cv_r2": sc.cv_r2, "knn_accuracy": sc.knn_accuracy}


def state_latents(z: np.ndarray, conf: np.ndarray, state_values: np.ndarray) -> np.ndarray:
    return np.stack([z[np.isclose(conf, s)].mean(0) for s in state_values])


def cryodrgn_epoch(exe: str, ck: dict, idx: np.ndarray, conf: np.ndarray, state_values: np.ndarray, work: Path,
                   threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all latents, maps at ``idx``'s latents, maps at the state-mean latents) of one epoch."""
    import mrcfile

    with open(ck["z"], "rb") as fh:
        z_all = np.asarray(pickle.load(fh), np.float32)
    zs = np.concatenate([z_all[idx], state_latents(z_all, conf, state_values)])
    work.mkdir(parents=True, exist_ok=True)
    np.savetxt(work / "z.txt", zs)
    cfg = Path(ck["weights"]).parent / "config.yaml"
    vdir = work / "vols"
    shutil.rmtree(vdir, ignore_errors=True)
    subprocess.run([exe, "eval_vol", ck["weights"], "-c", str(cfg), "--zfile", str(work / "z.txt"), "-o", str(vdir)],
                   check=True, env=child_env(threads, extra_path=False), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    files = sorted(vdir.glob("*.mrc"))
    if len(files) != len(zs):
        raise RuntimeError(f"eval_vol wrote {len(files)} maps for {len(zs)} latents in {vdir}")
    vols = np.stack([mrcfile.read(f).astype(np.float32) for f in files])
    return z_all, vols[:len(idx)], vols[len(idx):]


def cryoformer_epoch(ck: dict, data_dir: Path, idx: np.ndarray, conf: np.ndarray, state_values: np.ndarray,
                     box: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from cryoformer.infer import Reconstruction
    from cryoformer_ext.formats.star import read_particles_star

    star = read_particles_star(data_dir / "particles.star", data_dir)
    rec = Reconstruction.load(ck["weights"])
    z_all = rec.encode(star.data)
    return z_all, rec.volumes(z_all[idx], box), rec.volumes(state_latents(z_all, conf, state_values), box)


# ---------------------------------------------------------------------------------------------------
# report

SCORES = [("fsc_auc", "mean FSC-AUC (particle maps)"), ("moving_corr", "moving-region corr. (state maps)"),
          ("spearman_pc1", "|Spearman| PC1 vs t"), ("knn_accuracy", "kNN accuracy of the state")]


def time_to(epochs: list[dict], key: str, target: float) -> float | None:
    """Cumulative training seconds at the first epoch whose ``key`` reaches ``target``."""
    for e in epochs:
        if e.get(key) is not None and e[key] >= target:
            return e["cum_train_s"]
    return None


def compare(res: dict) -> dict:
    """Per score: each method's best value and the wall time to it, and the time each needs to reach the
    other's best (None: never reached)."""
    out: dict = {}
    methods = res["methods"]
    for key, _ in SCORES:
        row: dict = {}
        for name, m in methods.items():
            vals = [e[key] for e in m["epochs"] if e.get(key) is not None]
            if not vals:
                continue
            best = max(vals)
            row[name] = {"best": best, "time_to_best_s": time_to(m["epochs"], key, best)}
        for name in row:
            for other in row:
                if other != name:
                    row[name][f"time_to_{other}_best_s"] = time_to(methods[name]["epochs"], key, row[other]["best"])
        if set(row) == {"cryodrgn", "cryoformer"}:
            a, b = row["cryodrgn"]["time_to_best_s"], row["cryoformer"].get("time_to_cryodrgn_best_s")
            row["cryodrgn_time_over_cryoformer_time_at_cryodrgn_best"] = (a / b) if a and b else None
        out[key] = row
    return out


def _with_ext(stem: Path, ext: str) -> Path:
    """``stem`` + ``ext``: the stem holds the SNR (``..._snr0.1``), which ``with_suffix`` would cut."""
    return stem.parent / (stem.name + ext)


def write_report(res: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    res["comparison"] = compare(res)
    _with_ext(stem, ".json").write_text(json.dumps(res, indent=2) + "\n")
    d = res["dataset"]
    lines = [f"# cryoFormer vs cryoDRGN{' (SMOKE RUN, --quick: not the benchmark)' if res['quick'] else ''}", "",
             f"Data: {d['n']} particles, D={d['box']}, {d['pixel_size_A']:.2f} Å/px, states {d['states']}, "
             f"SNR {d['snr']}, poses + CTF given. {res['threads']} CPU thread(s) per method; {res['date']}; "
             f"`{res['command']}`", "",
             *(["The two methods trained at the same time, one process each (`--only`), sharing the machine.", ""]
               if res.get("concurrent") else []),
             "| method | epoch | cum. train s | img/s | FSC-AUC | res @0.5 (px) | moving corr | states recovered | "
             "\\|Spearman\\| PC1 | CV R² | kNN acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["methods"].items():
        for e in m["epochs"]:
            lines.append(f"| {name} | {e['epoch']} | {e['cum_train_s']:.0f} | {e['images_per_s']:.1f} | "
                         f"{e['fsc_auc']:.4f} | {e['res_px_fsc0.5']:.2f} | {e.get('moving_corr', float('nan')):.3f} | "
                         f"{e.get('states_recovered', '-')} | {e['spearman_pc1']:.3f} | {e['cv_r2']:.3f} | "
                         f"{(e['knn_accuracy'] if e['knn_accuracy'] is not None else float('nan')):.3f} |")
    lines += ["", "| score | method | best | wall s to best | wall s to the other's best |", "|---|---|---|---|---|"]
    for key, label in SCORES:
        for name, r in res["comparison"].get(key, {}).items():
            if not isinstance(r, dict):
                continue
            other = [v for k, v in r.items() if k.startswith("time_to_") and k.endswith("_best_s") and k != "time_to_best_s"]
            lines.append(f"| {label} | {name} | {r['best']:.3f} | {r['time_to_best_s']:.0f} | "
                         f"{'never' if not other or other[0] is None else f'{other[0]:.0f}'} |")
    lines.append("")
    for name, m in res["methods"].items():
        lines.append(f"* {name}: peak RSS {m['peak_rss_GB']:.2f} GB; map orientation used {m['orientation']['transform']} "
                     f"(AUC {m['orientation']['auc_best']:.4f} vs {m['orientation']['auc_identity']:.4f} as written)")
        if m.get("job"):
            lines.append(f"  job parameters: `{m['job']}`")
    if res.get("note"):
        lines += ["", res["note"]]
    _with_ext(stem, ".md").write_text("\n".join(lines) + "\n")
    plot_curves(res, _with_ext(stem, ".png"))


def merge_report(res: dict, stem: Path) -> None:
    """``--only`` runs: add this method to the results of the same dataset, so the two methods can train at
    the same time (one process each, ``--threads`` each) and still share one report. A lock file keeps two
    runs that end together from overwriting each other."""
    import fcntl

    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(_with_ext(stem, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(_with_ext(stem, ".json").read_text()) if _with_ext(stem, ".json").exists() else None
        same = lambda d: {k: v for k, v in d.items() if not k.endswith("_s")}  # noqa: E731 - not the timings
        if old and same(old["dataset"]) == same(res["dataset"]) and old["threads"] == res["threads"]:
            methods = {**old["methods"], **res["methods"]}
            commands = [c for c in old.get("commands", [old["command"]]) if c != res["command"]] + [res["command"]]
            res = {**old, "methods": {k: methods[k] for k in ("cryodrgn", "cryoformer") if k in methods},
                   "commands": commands, "command": " ; ".join(commands),
                   "date": res["date"], "concurrent": True}
        write_report(res, stem)
    _with_ext(stem, ".lock").unlink(missing_ok=True)


def plot_curves(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001 - the plot is optional
        print(f"no plot: {err}")
        return
    d = res["dataset"]
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.6))
    for ax, (key, label) in zip(axes, SCORES):
        for name, m in res["methods"].items():
            pts = [(e["cum_train_s"] / 60, e[key]) for e in m["epochs"] if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=name)
        ax.set_xlabel("training wall time (min)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"D={d['box']}, N={d['n']}, {d['states']} states, SNR {d['snr']}"
                 + (" (smoke run)" if res["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_method(name: str, run: dict, epoch_fn, a, conf: np.ndarray, idx: np.ndarray, states: np.ndarray | None,
                    state_values: np.ndarray | None) -> dict:
    from cryoformer.simulate import true_volume

    cks = run.pop("checkpoints")
    if len(cks) != len(run["epoch_s"]):
        print(f"warning: {name}: {len(cks)} checkpoints, {len(run['epoch_s'])} epoch times", flush=True)
    per_epoch = [epoch_fn(ck, e) for e, ck in enumerate(cks, 1)]
    tf, orient = choose_transform(per_epoch[-1][1][0], true_volume(float(conf[idx[0]]), a.box))
    epochs, cum = [], 0.0
    for e, (z_all, vols, state_vols) in enumerate(per_epoch, 1):
        es = run["epoch_s"][e - 1] if e - 1 < len(run["epoch_s"]) else float("nan")
        cum += es
        row = {"epoch": e, "epoch_s": es, "cum_train_s": cum, "images_per_s": a.n / es,
               **map_quality(vols, conf[idx], a.box, tf), **latent_quality(z_all, conf, states)}
        if state_values is not None:
            row.update(state_quality(state_vols, state_values, a.box, tf))
        epochs.append(row)
        print(name, json.dumps(epochs[-1]), flush=True)
    return {**run, "orientation": orient, "epochs": epochs}


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("suite", "the equal-footing comparison on a suite built by bench/suite/build.py")
    g.add_argument("--suite", type=Path, default=None, help="suite folder (with suite.json): run the comparison on it")
    g.add_argument("--train-box", type=int, nargs="+", default=[32, 64], help="training box of BOTH methods")
    g.add_argument("--methods", default="cryodrgn,cryoformer", help="run in this order, one at a time")
    g.add_argument("--datasets", default="", help="comma-separated key prefixes (e.g. a_,e_adk_snr0.1); all by default")
    g.add_argument("--tag", default="full", help="results go to bench/results/suite_<tag>.{json,md} and *_<dataset>_D<box>.png")
    g.add_argument("--keep-work", action="store_true", help="keep checkpoints and maps under --work")


def run_suite_comparison(a: argparse.Namespace) -> None:
    """``--suite``: see :mod:`bench.suite.harness` (both methods at the same training box, in turn)."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)
    from bench.suite.harness import run_suite

    a.results, a.command = RESULTS, "python " + " ".join(sys.argv)
    if a.work == DEFAULT_WORK:
        a.work = DEFAULT_WORK.with_name("cryoformer_suite_runs")
    run_suite(a)
    print((RESULTS / f"suite_{a.tag}.md").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--states", default="10", help="number of conformations along the motion, or 'continuous'")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--eval-particles", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cf-job", default="{}", help="cryoFormer job parameters over the defaults, as JSON")
    p.add_argument("--cf-epochs", type=int, default=None, help="cryoFormer epochs (default: --epochs)")
    p.add_argument("--quick", action="store_true", help="smoke run: box 32, 500 particles, 2 epochs, 20 eval particles")
    p.add_argument("--skip-install", action="store_true", help="use the existing cryoDRGN venv")
    p.add_argument("--isolated-venv", action="store_true",
                   help="venv without system packages (downloads torch from the PyTorch CPU index)")
    p.add_argument("--torch", default="2.13.0")
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--only", choices=["cryodrgn", "cryoformer"], default=None)
    p.add_argument("--timeout", type=float, default=24 * 3600, help="per training run (s)")
    p.add_argument("--child-cryoformer", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    add_suite_arguments(p)
    a = p.parse_args()
    if a.child_cryoformer:
        child_cryoformer(*a.child_cryoformer, a.epochs, a.threads, a.batch, a.seed, a.cf_job)
        return
    if a.suite is not None:
        run_suite_comparison(a)
        return
    if a.quick:
        a.box, a.n, a.epochs, a.eval_particles = 32, 500, 2, 20
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch

    torch.set_num_threads(a.threads)

    methods = ["cryodrgn", "cryoformer"] if a.only is None else [a.only]
    exe = None
    if "cryodrgn" in methods:
        if not a.skip_install:
            install_cryodrgn(a.venv, a.torch, a.isolated_venv)
        exe = cryodrgn_exe(a.venv)
    work = a.work / f"D{a.box}_N{a.n}_snr{a.snr:g}"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    res = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "host": platform.node(), "cpu_count": os.cpu_count(), "threads": a.threads, "quick": a.quick,
           "dataset": make_dataset(data, a.n, a.box, a.states, a.snr, a.seed), "methods": {}}
    print(json.dumps(res["dataset"]), flush=True)
    conf = np.load(data / "conformation.npy")
    idx = np.unique(np.linspace(0, a.n - 1, a.eval_particles).round().astype(int))
    discrete = a.states != "continuous"
    state_values = np.unique(conf) if discrete else None
    states = np.searchsorted(state_values, conf) if discrete else None
    res["eval_particles"] = len(idx)

    for name in methods:
        out = work / name
        if name == "cryodrgn":
            run = train_cryodrgn(exe, data, out, a.epochs, a.threads, a.batch, a.seed, a.timeout)
            fn = lambda ck, e: cryodrgn_epoch(exe, ck, idx, conf, state_values, work / f"eval_{name}_{e}", a.threads)  # noqa: E731
        else:
            run = train_cryoformer(data, out, a.cf_epochs or a.epochs, a.threads, a.batch, a.seed, a.timeout, a.cf_job)
            run["job"] = a.cf_job
            fn = lambda ck, e: cryoformer_epoch(ck, data, idx, conf, state_values, a.box)  # noqa: E731
        res["methods"][name] = evaluate_method(name, run, fn, a, conf, idx, states, state_values)

    stem = RESULTS / ("vs_cryodrgn_quick" if a.quick else f"vs_cryodrgn_D{a.box}_N{a.n}_snr{a.snr:g}")
    if a.only:
        merge_report(res, stem)
    else:
        write_report(res, stem)
    print(_with_ext(stem, ".md").read_text())
    if not a.quick:
        print(f"work files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
