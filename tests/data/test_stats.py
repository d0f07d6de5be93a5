import numpy as np
import torch

from kdlab.data.stats import channel_mean_std


def test_matches_numpy_for_images():
    rng = np.random.default_rng(0)
    values = rng.uniform(size=(17, 3, 5, 6)) * np.array([1.0, 0.5, 0.1])[None, :, None, None]
    mean, std = channel_mean_std(torch.from_numpy(values.astype(np.float32)))
    np.testing.assert_allclose(mean, values.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, values.std(axis=(0, 2, 3)), rtol=1e-5)
    assert all(type(item) is float for item in mean + std)


def test_matches_numpy_for_sequences_and_flat_features():
    rng = np.random.default_rng(1)
    sequences = rng.uniform(size=(11, 2, 40)).astype(np.float32)
    mean, std = channel_mean_std(torch.from_numpy(sequences))
    np.testing.assert_allclose(mean, sequences.astype(np.float64).mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, sequences.astype(np.float64).std(axis=(0, 2)), rtol=1e-5)
    flat = rng.uniform(size=(9, 4)).astype(np.float32)  # every feature is its own channel
    mean, std = channel_mean_std(torch.from_numpy(flat))
    assert len(mean) == len(std) == 4
    np.testing.assert_allclose(std, flat.astype(np.float64).std(axis=0), rtol=1e-5)


def test_constant_channel_gets_unit_std():
    inputs = torch.rand(8, 2, 4, 4)
    inputs[:, 1] = 0.25
    mean, std = channel_mean_std(inputs)
    assert mean[1] == 0.25 and std[1] == 1.0
    assert 0 < std[0] < 1
