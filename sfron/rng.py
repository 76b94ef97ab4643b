"""
Every random stream of the repository, in one table. A draw is keyed by (seed, stream, *positions), e.g. the
noise of sample p of the forget stream is keyed (seed, "forget/draws", p); the key is packed as fixed-width
64-bit integers (distinct keys give distinct bytes) and hashed with BLAKE2b into the seed of a CPU generator.
Two keys can only share a generator through a 64-bit hash collision: streams never overlap, however long.
"""
import hashlib
import struct

import torch

# stream -> salt. A data stream has two: its epoch permutations ("order") and the per-sample draws ("draws").
STREAMS = {
    "forget-fisher/order": 1, "forget-fisher/draws": 2,
    "remain-fisher/order": 3, "remain-fisher/draws": 4,
    "forget/order": 5, "forget/draws": 6,
    "remain/order": 7, "remain/draws": 8,
    "train/order": 9, "train/draws": 10,
    "replay-fisher/order": 15, "replay-fisher/draws": 16,       # the EWC Fisher on replay samples (SA)
    "forget-gradient/order": 17, "forget-gradient/draws": 18,   # SalUn's gradient saliency
    "sample/noise": 11,        # initial noise of image i (sample.py, sample_ddp.py)
    "sample/step-noise": 12,   # DDPM step noise of image i
    "sample/labels": 13,       # the random classes of sample_ddp.py --num-fid-samples
    "snapshot/noise": 14,      # the initial noise of forget.py's sample grids
    "surrogate/images": 19,    # Selective Amnesia's uniform-noise images
    "replay/noise": 20,        # the initial noise of generated replay sample i
    "attack/draws": 21,        # attack.py: which images, timesteps and noise at attack step s
    "attack/noise": 22,        # attack.py: the initial noise of measured sample i
    "attack/images": 23,       # attack.py: which forget-class images the attacker holds
}


def stream_seed(seed, stream, *keys):
    """The 63-bit generator seed of a key (seed, stream, *keys)."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; add it to sfron.rng.STREAMS")
    packed = struct.pack(f"<{2 + len(keys)}q", int(seed), STREAMS[stream], *(int(k) for k in keys))
    digest = hashlib.blake2b(packed, digest_size=8, person=b"sfron-streams").digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def generator(seed, stream, *keys):
    """A CPU torch.Generator for the key (seed, stream, *keys)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, *keys))
