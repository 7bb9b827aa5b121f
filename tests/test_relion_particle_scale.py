"""A RELION External job's maps and mask are what the next RELION job takes as they are.

Box-32, 3 Å/px particles trained at box 16 (``test_relion_pipeline``'s project, run through
``relion_pipeliner`` as the GUI would): every map node and the ``Mask3D`` node must be at box 32 and
3.0 Å/px, with the header RELION and other programs read (float32, origin 0, x fastest), and RELION's
own ``relion_image_handler --multiply`` must accept the consensus map and the mask together.
"""

from __future__ import annotations

import json
import re
import shutil

import mrcfile
import numpy as np
import pytest

from test_relion_pipeline import APIX, BOX, N_PART, TINY, add_external_job, job_status, pipeline, project, run_job, sh  # noqa: F401

pytestmark = [pytest.mark.relion,
              pytest.mark.skipif(shutil.which("relion_pipeliner") is None, reason="RELION 3.1 programs not on PATH")]


@pytest.fixture(scope="module")
def finished(project) -> str:
    params = {k: v for k, v in TINY.items() if k != "pcs"}  # RELION 3.1 takes 10 label/value pairs
    job = add_external_job(project, "Simulated/particles.star", {**params, "epochs": "5", "zdim": "3"})
    run_job(project, job, "scale")
    jd = project / job
    assert (jd / "RELION_JOB_EXIT_SUCCESS").exists(), (jd / "run.err").read_text()
    assert job_status(project, job) == 2
    return job


def node_types(project, job: str) -> dict[str, int]:
    pnodes = pipeline(project)["pipeline_nodes"]
    ours = pnodes[pnodes["rlnPipeLineNodeName"].str.startswith(job)]
    return dict(zip(ours["rlnPipeLineNodeName"], ours["rlnPipeLineNodeType"].astype(int)))


def relion_stats(project, path: str) -> tuple[float, str]:
    out = sh(["relion_image_handler", "--i", path, "--stats"], project).stdout
    return float(re.search(r"angpix\s*=\s*([0-9.eE+-]+)", out).group(1)), out


def test_maps_and_mask_nodes_at_the_particles_scale(project, finished):
    types = node_types(project, finished)
    masks = [n for n, t in types.items() if t == 7]
    assert masks == [f"{finished}analysis/solvent_mask.mrc"]
    assert f"{finished}analysis/occupancy_mask.mrc" not in types  # the occupancy grid is no solvent mask
    maps = [n for n, t in types.items() if t == 6]
    assert len(maps) >= 4
    for name in maps + masks:
        angpix, stats = relion_stats(project, name)
        assert angpix == pytest.approx(APIX, rel=1e-4), name
        assert f"= {BOX} x {BOX} x {BOX} x 1" in stats, name
        with mrcfile.open(project / name, permissive=True) as m:
            h = m.header
            assert int(h.mode) == 2 and (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3), name
            assert (float(h.origin.x), float(h.origin.y), float(h.origin.z)) == (0.0, 0.0, 0.0), name
            assert (int(h.nxstart), int(h.nystart), int(h.nzstart)) == (0, 0, 0), name


def test_relion_multiplies_consensus_by_mask(project, finished):
    cons, mask = f"{finished}analysis/consensus.mrc", f"{finished}analysis/solvent_mask.mrc"
    sh(["relion_image_handler", "--i", cons, "--multiply", mask, "--o", "masked_consensus.mrc"], project)
    with mrcfile.open(project / "masked_consensus.mrc") as m:
        masked = np.asarray(m.data, np.float64)
    with mrcfile.open(project / cons) as m:
        vol = np.asarray(m.data, np.float64)
    with mrcfile.open(project / mask) as m:
        msk = np.asarray(m.data, np.float64)
    np.testing.assert_allclose(masked, vol * msk, rtol=1e-5, atol=1e-6 * np.abs(vol).max())
    # soft, small, and holding the consensus density
    assert ((msk > 0.05) & (msk < 0.95)).sum() > 0.1 * (msk >= 0.95).sum()
    # small: the simulated molecule fills the middle of this tight box (blob centres within 7 px of the
    # centre on each axis) and a 5-epoch map is blurred, so the mask is large here, but the box's corners
    # (over 20 px from the centre) are solvent and must be masked out
    r = np.sqrt(sum(g ** 2 for g in np.mgrid[:BOX, :BOX, :BOX] - BOX // 2))
    assert np.mean(msk > 0.5) < 0.6 and np.mean(msk[r > 20] == 0) > 0.9
    strong = vol >= 0.5 * vol.max()
    assert np.mean(msk[strong] > 0.5) > 0.99
    # and the molecule: most of the density of the map the particles were projected from (not of the
    # consensus, whose weak positive haze away from the molecule a good mask leaves out). 5 epochs: after
    # 2 (400 images) the maps of the default job with the query position code were still forming, and the
    # mask held 47 % of that density (without the code: over 80 %); after 4, without the norm on the
    # deformation tokens, 77 %
    with mrcfile.open(project / "map.mrc") as m:
        truth = np.clip(np.asarray(m.data, np.float64), 0, None)
    assert (truth * (msk > 0.5)).sum() > 0.8 * truth.sum()


def test_umap_written_for_the_job(project, finished):
    umap = np.load(project / finished / "analysis" / "umap.npy")
    assert umap.shape == (N_PART, 2) and np.isfinite(umap).all()
    s = json.loads((project / finished / "analysis" / "summary.json").read_text())
    assert s["umap"]["file"] == "umap.npy" and s["map_box"] == BOX
