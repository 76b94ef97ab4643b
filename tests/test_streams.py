"""The random streams: every draw has its own key, and no two keys share a generator."""
import sfron.data as data
from helpers import make_image_folder
from sfron.data import DiffusionBatches, StreamConfig, class_folders, unlearn_datasets
from sfron.dist import Dist
from sfron.rng import STREAMS, stream_seed


def test_the_shuffle_of_epoch_e_and_the_draws_of_position_e_have_different_keys(tmp_path, monkeypatch):
    """Every generator a data stream seeds (one per epoch for the order, one per sample for its draws) is distinct."""
    make_image_folder(tmp_path, num_classes=2, per_class=3)
    forget, _ = unlearn_datasets(class_folders(str(tmp_path), 2), 0, 8)
    seeds, original = [], data.generator

    def record(*key):
        g = original(*key)
        seeds.append(g.initial_seed())
        return g
    monkeypatch.setattr(data, "generator", record)
    config = StreamConfig(stream="forget", seed=0, global_batch=2)
    batches = list(DiffusionBatches(forget, config, Dist(), range(6)))  # 12 samples: 4 epochs of 3 images
    assert len(batches) == 6 and len(seeds) == 12 + 4
    assert len(set(seeds)) == len(seeds)


def test_stream_keys_do_not_collide():
    """Keys that a multiplicative mix of (seed, stream, position) maps together, and many others, stay apart."""
    multiplier = 1_000_003
    assert stream_seed(0, "forget/draws", multiplier) != stream_seed(0, "remain/draws", 0)
    assert stream_seed(1, "forget/draws", 0) != stream_seed(0, "forget/draws", multiplier)
    assert stream_seed(0, "sample/noise", 7) != stream_seed(0, "snapshot/noise", 7)
    keys = {stream_seed(seed, stream, p) for seed in (0, 1) for stream in STREAMS for p in range(2000)}
    assert len(keys) == 2 * len(STREAMS) * 2000
    assert all(0 <= k < 2 ** 63 for k in keys)
