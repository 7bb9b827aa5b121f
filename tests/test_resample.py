"""Maps at another box than the training box: Fourier resampling against analytic maps.

The simulator's true maps are sums of Gaussians written analytically at any box, and from box 32 on
essentially band-limited to the smaller box (at box 24 they are not: 0.3 % aliasing), so resampling one box's map must give the other box's map.
"""

import numpy as np
import pytest
import torch

from cryoformer.infer import Reconstruction
from cryoformer.lattice import fourier_resample_volume
from cryoformer.metrics import fsc
from cryoformer.model import CryoFormer, ModelConfig
from cryoformer.simulate import true_volume


@pytest.mark.parametrize("src, dst", [(32, 64), (64, 32), (32, 48)])
def test_resampled_map_equals_the_analytic_map_at_the_new_box(src, dst):
    out = fourier_resample_volume(true_volume(0.3, src), dst)
    ref = true_volume(0.3, dst)
    assert out.shape == (dst,) * 3
    assert np.abs(out - ref).max() < 1e-3 * ref.max()


def test_odd_boxes_are_refused():
    with pytest.raises(ValueError, match="even"):
        fourier_resample_volume(np.zeros((16, 16, 16)), 33)


def test_maps_above_the_training_box_have_nothing_beyond_its_nyquist():
    """A box-16 model's map at box 32: nothing beyond the training box's Nyquist sphere (radius 8), and
    below it the model's own box-16 map."""
    torch.manual_seed(0)
    rec = Reconstruction(CryoFormer(ModelConfig(box=16, pixel_size_A=4.0, zdim=2)))
    z = np.array([[0.3, -0.2]], np.float32)
    small, large = rec.volumes(z)[0], rec.volumes(z, 32)[0]
    spec = np.abs(np.fft.fftshift(np.fft.fftn(large)))
    k = np.arange(32) - 16
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    assert spec[radius > 8].max() < 1e-6 * spec.max()
    back = fourier_resample_volume(large, 16)        # shells up to the Nyquist sphere come back
    assert fsc(back, small)[:8].min() > 0.999
