"""
Forget and remain data. An ImageNet-style root holds <data-path>/train/<class folder>/<images>. The model's class
index of a folder: its ImageNet index where every folder is named by an ImageNet synset (n02099601 is 207, whatever
other folders are present) and the model has 1000 classes; else the index a --class-index-file gives it; else its
position in sorted order (torchvision ImageFolder semantics), which only a root holding a folder for every class of
the model can use. The forget set is the folder of class --forget-class, the remain set all the others.

Batches are drawn from a deterministic stream: sample p of the stream has the same image, flip, timestep, noise
and label drop whatever the batch size and the number of processes (each process takes its slice of a global
batch), and a resumed run continues the stream where it stopped.
"""
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .files import atomic_torch_save, safe_torch_load
from .preemption import ignore_stop_signals
from .rng import generator
from .utils import UserError, check_class_index
from .vae import encode_moments, sample_latents

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# each with its two salts ("<stream>/order", "<stream>/draws") in rng.STREAMS
DATA_STREAMS = ("forget-fisher", "remain-fisher", "forget", "remain", "train", "replay-fisher", "forget-gradient")


def center_crop_arr(pil_image, image_size):
    """ADM's center crop: halve with a box filter while the short side is >= 2x the target, resize, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def find_class_folders(data_path, split="train"):
    """(split root, sorted class folder names) of an ImageNet-style root; clear errors when it is not one."""
    root = os.path.join(data_path, split)
    if not os.path.isdir(data_path):
        raise UserError(f"--data-path {data_path} does not exist")
    if not os.path.isdir(root):
        raise UserError(f"--data-path {data_path} has no {split}/ folder "
                        f"(expected <data-path>/{split}/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    return root, classes


IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ClassFolders:
    """The class folders of a root (sorted names) and the model's class index of each; `rule` says how the indices
    were found, for the log."""
    root: str
    names: tuple
    indices: tuple
    rule: str

    def position(self, class_index, flag="--forget-class"):
        """The position of the folder of the model's class class_index, or one clear error."""
        if class_index in self.indices:
            return self.indices.index(class_index)
        raise UserError(f"{flag} {class_index}: no class folder of {self.root} has that class ({self.rule})")

    def samples(self, class_indices):
        """[(path, the model's class index)] of every image of the given classes of the model."""
        positions = [self.position(c) for c in class_indices]
        return [(path, self.indices[pos]) for path, pos in list_images(self.root, self.names, positions)]


def imagenet_synsets():
    """{synset: ImageNet class index} from timm's ImageNet table."""
    from timm.data import ImageNetInfo
    return {name: i for i, name in enumerate(ImageNetInfo().label_names())}


def read_class_index_file(path, names, num_classes):
    """The class index of each folder name from a file of 'folder index' lines."""
    if not os.path.isfile(path):
        raise UserError(f"--class-index-file {path} does not exist")
    given = {}
    for number, line in enumerate(open(path), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{path}:{number}: expected 'folder index', got {line.strip()!r}")
        given[parts[0]] = int(parts[1])
    missing = [n for n in names if n not in given]
    if missing:
        raise UserError(f"--class-index-file {path} gives no index for the folder {missing[0]}")
    indices = tuple(given[n] for n in names)
    for name, index in zip(names, indices):
        check_class_index(index, num_classes or max(indices) + 1, f"{path}: the index of {name}", "the model")
    if len(set(indices)) != len(indices):
        raise UserError(f"--class-index-file {path} gives two folders the same class index")
    return indices


def class_folders(data_path, num_classes=None, index_file=None, split="train"):
    """
    The ClassFolders of an ImageNet-style root for a model of num_classes classes (None: unknown, e.g. when only
    samples are evaluated): by --class-index-file, by ImageNet synset, or by sorted position (see the module text).
    """
    root, names = find_class_folders(data_path, split)
    if num_classes is not None and len(names) > num_classes:
        raise UserError(f"{root} has {len(names)} class folders but the model has {num_classes} classes")
    if index_file is not None:
        return ClassFolders(root, tuple(names), read_class_index_file(index_file, names, num_classes),
                            f"indices from {index_file}")
    synsets = imagenet_synsets()
    if num_classes in (None, IMAGENET_CLASSES) and all(n in synsets for n in names):
        return ClassFolders(root, tuple(names), tuple(synsets[n] for n in names), "ImageNet synset indices")
    if num_classes is not None and len(names) < num_classes:
        raise UserError(f"{root} has {len(names)} class folders for a model of {num_classes} classes, and they are "
                        f"not all ImageNet synsets: which class each holds is unknown. Give --class-index-file, a "
                        f"file of 'folder index' lines (e.g. '{names[0]} 0')")
    return ClassFolders(root, tuple(names), tuple(range(len(names))), "sorted folder positions")


def list_images(root, classes, class_indices):
    """[(path, class index)] of every image under the chosen class folders, in sorted order."""
    samples = []
    for idx in class_indices:
        folder = os.path.join(root, classes[idx])
        found = [os.path.join(dirpath, f) for dirpath, _, files in sorted(os.walk(folder, followlinks=True))
                 for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            raise UserError(f"class folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)})")
        samples += [(path, idx) for path in found]
    return samples


class ImageSet(Dataset):
    """
    Images of some classes, center-cropped to image_size and scaled to [-1, 1]. Indexed by (index, flip) so
    that the random horizontal flip is part of the deterministic stream; a plain index means no flip.
    """

    def __init__(self, samples, image_size, classes, root=None):
        self.samples = samples
        self.image_size = image_size
        self.classes = classes
        self.root = root  # the split folder the sample paths start with
        self.targets = [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def only_class(self, label):
        """The images of one class of this set, or one clear error where it has none."""
        samples = [(path, y) for path, y in self.samples if y == label]
        if not samples:
            raise UserError(f"{self.root} has no image of class {label} among these images")
        return ImageSet(samples, self.image_size, self.classes, self.root)

    def load(self, index, flip=False):
        """The image (3, S, S) in [-1, 1] and its class index."""
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
        except UnidentifiedImageError:
            raise UserError(f"cannot read image {path}: not an image file PIL can decode") from None
        except (OSError, SyntaxError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        image = center_crop_arr(image, self.image_size)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, S, S)
        return x / 127.5 - 1.0, label

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        return self.load(index, flip)


class NoiseImages(Dataset):
    """
    n images of uniform noise in [-1, 1], all labelled `label`: Selective Amnesia's surrogate for the forget
    class. Image i depends only on (seed, i).
    """

    def __init__(self, n, image_size, label, seed):
        self.n, self.image_size, self.label, self.seed = n, image_size, label, seed
        self.samples = [(f"uniform-noise-{seed}-{i}", label) for i in range(n)]  # names for the latent cache
        self.targets = [label] * n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        g = generator(self.seed, "surrogate/images", index)
        x = torch.rand((3, self.image_size, self.image_size), generator=g) * 2 - 1   # (3, S, S)
        return (x.flip(-1) if flip else x), self.label


class TensorImages(Dataset):
    """Images already in memory (N, 3, S, S) in [-1, 1] with their labels, e.g. generated replay samples."""

    def __init__(self, images, labels, name="generated"):
        self.images, self.labels = images.cpu(), [int(y) for y in labels]
        self.image_size = images.shape[-1]
        self.samples = [(f"{name}-{i}", y) for i, y in enumerate(self.labels)]
        self.targets = self.labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        x = self.images[index]
        return (x.flip(-1) if flip else x), self.labels[index]


def unlearn_datasets(folders, forget_class, image_size):
    """(forget set, remain set) of a ClassFolders, labelled with the model's class indices."""
    forget = ImageSet(folders.samples([forget_class]), image_size, folders.names, folders.root)
    remain_ids = [c for c in folders.indices if c != forget_class]
    if not remain_ids:
        raise UserError(f"{folders.root} has no class besides the forget class: the remain set would be empty")
    remain = ImageSet(folders.samples(remain_ids), image_size, folders.names, folders.root)
    return forget, remain


def dataset_fingerprint(*datasets):
    """SHA-256 of the image files (paths below the split folder) and labels of the datasets: what a run saw."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for path, label in dataset.samples:
            digest.update(f"{label}\t{os.path.relpath(path, dataset.root)}\n".encode())
    return digest.hexdigest()


#################################################################################
#                      The deterministic stream of batches                      #
#################################################################################

class SampleStream:
    """
    An endless stream of (index, flip) over n items: epoch e is a permutation drawn from the key
    (seed, "<stream>/order", e), each item with a fair coin for the horizontal flip. Position p of the stream is a
    pure function of p.
    """

    def __init__(self, n, seed, stream, flip=True):
        self.n, self.seed, self.stream, self.flip = n, seed, stream, flip
        self._epoch, self._perm, self._flips = None, None, None

    def _load_epoch(self, epoch):
        if epoch != self._epoch:
            g = generator(self.seed, f"{self.stream}/order", epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            flips = torch.rand(self.n, generator=g) < 0.5
            self._flips = flips.tolist() if self.flip else [False] * self.n
            self._epoch = epoch

    def take(self, start, count):
        """Stream positions [start, start + count) as a list of (index, flip)."""
        out = []
        for p in range(start, start + count):
            epoch, offset = divmod(p, self.n)
            self._load_epoch(epoch)
            out.append((self._perm[offset], self._flips[offset]))
        return out


class _RankBatches(torch.utils.data.Sampler):
    """For steps start..stop-1: this rank's slice of global batch `step` of the stream."""

    def __init__(self, stream, global_batch, shard, start, stop):
        self.stream, self.global_batch, self.shard, self.start, self.stop = stream, global_batch, shard, start, stop

    def __iter__(self):
        lo, hi = self.shard
        for step in range(self.start, self.stop):
            yield self.stream.take(step * self.global_batch + lo, hi - lo)

    def __len__(self):
        return self.stop - self.start


class LatentCache:
    """
    VAE posterior moments (mean | std, scaled) of every image of a dataset under both flips, encoded once (the
    processes share the work) and kept on the device, for data used more than once: the forget set is drawn
    n_iters x batch-size times. Optionally saved to / loaded from a file.
    """

    def __init__(self, moments, labels, loaded=False):
        self.moments = moments  # (N, 2 flips, 2C, h, w)
        self.labels = labels    # (N,)
        self.loaded = loaded    # read from a file rather than encoded

    @classmethod
    @torch.no_grad()
    def build(cls, dataset, vae, dist, batch_size=32, num_workers=0, path=None):
        """Encodes (or loads from path, if it holds this dataset's moments) the moments of every image."""
        tag = {"samples": [p for p, _ in dataset.samples], "image_size": dataset.image_size}
        if path and os.path.isfile(path):
            cached = safe_torch_load(path, what="latent cache")
            if isinstance(cached, dict) and cached.get("tag") == tag:
                return cls(cached["moments"].to(dist.device), torch.tensor(dataset.targets), loaded=True)
        keys = [(i, f) for i in range(len(dataset)) for f in (False, True)]
        per_rank = -(-len(keys) // dist.world_size)
        mine = keys[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        loader = DataLoader(dataset, batch_sampler=[mine[i:i + batch_size] for i in range(0, len(mine), batch_size)],
                            num_workers=num_workers, worker_init_fn=ignore_stop_signals)
        side = dataset.image_size // 8
        parts = [torch.empty((0, 2 * vae.config.latent_channels, side, side), device=dist.device)]
        for x, _ in loader:
            mean, std = encode_moments(vae, x.to(dist.device))
            parts.append(torch.cat([mean, std], dim=1).float())
        local = torch.cat(parts)
        moments = dist.all_gather_padded(local, per_rank)[:len(keys)]
        moments = moments.view(len(dataset), 2, *moments.shape[1:])
        if path and dist.is_main:
            atomic_torch_save({"tag": tag, "moments": moments.cpu()}, path)
        return cls(moments, torch.tensor(dataset.targets))

    def lookup(self, keys):
        """(moments (b, 2C, h, w), labels (b,)) for a list of (index, flip)."""
        index = torch.tensor([i for i, _ in keys])
        flip = torch.tensor([int(f) for _, f in keys])
        return self.moments[index.to(self.moments.device), flip.to(self.moments.device)], self.labels[index]


@dataclass
class Batch:
    x: torch.Tensor          # (b, C, H, W) images or scaled latents
    y: torch.Tensor          # (b,) class labels
    t: torch.Tensor          # (b,) diffusion timesteps
    noise: torch.Tensor      # (b, C, H, W) the noise of the diffusion loss
    drop: torch.Tensor       # (b,) 1 where the label dropout of training mode replaces the label by the null class
    step: int = 0


@dataclass(frozen=True)
class StreamConfig:
    """What a stream of diffusion batches draws: which stream, its seed, the global batch and the draws' laws."""
    stream: str              # one of DATA_STREAMS: forget, remain, forget-fisher, remain-fisher, train
    seed: int
    global_batch: int
    num_timesteps: int = 1000
    dropout_prob: float = 0.0  # label dropout of training mode (0: eval mode)
    random_flip: bool = True


@dataclass
class LatentEncoder:
    """How images become a latent DiT's input: the VAE, the autocast dtype of its encodes, a cache of moments."""
    vae: torch.nn.Module
    autocast_dtype: Optional[torch.dtype] = None
    cache: Optional[LatentCache] = None


class DiffusionBatches:
    """
    The batches one process sees for the given steps of a stream: images (VAE-encoded by `encoder` for latent
    models, or taken from its latent cache), with their timesteps, noise and label-dropout draws.
    """

    def __init__(self, dataset, config, dist, steps, encoder=None, num_workers=0):
        if config.stream not in DATA_STREAMS:
            raise ValueError(f"unknown data stream {config.stream}")
        self.dataset, self.config, self.dist, self.steps = dataset, config, dist, steps
        self.encoder, self.num_workers = encoder, num_workers
        self.shard = dist.shard(config.global_batch)
        self.stream = SampleStream(len(dataset), config.seed, config.stream, flip=config.random_flip)

    def _loader(self):
        """(step, images or cached moments, labels) for each step, loaded in worker processes if asked."""
        keys = _RankBatches(self.stream, self.config.global_batch, self.shard, self.steps.start, self.steps.stop)
        cache = self.encoder.cache if self.encoder is not None else None
        if cache is not None:
            for step, batch_keys in zip(self.steps, keys):
                moments, y = cache.lookup(batch_keys)
                yield step, moments, y
            return
        loader = DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                            pin_memory=self.dist.device.type == "cuda", persistent_workers=False,
                            worker_init_fn=ignore_stop_signals)
        for step, (x, y) in zip(self.steps, loader):
            yield step, x, y

    def _draws(self, step, shape):
        """
        This rank's timesteps, label drops, diffusion noise and VAE noise. Each sample's draws come from the key
        (seed, "<stream>/draws", position in the stream), so they depend neither on the batch size nor on the
        number of processes.
        """
        lo, hi = self.shard
        config = self.config
        t, drop, noise, vae_eps = [], [], [], []
        for position in range(step * config.global_batch + lo, step * config.global_batch + hi):
            g = generator(config.seed, f"{config.stream}/draws", position)
            t.append(torch.randint(0, config.num_timesteps, (), generator=g))
            drop.append(torch.rand((), generator=g) < config.dropout_prob)
            noise.append(torch.randn(shape, generator=g))
            if self.encoder is not None:
                vae_eps.append(torch.randn(shape, generator=g))
        return (torch.stack(t), torch.stack(drop).long(), torch.stack(noise),
                torch.stack(vae_eps) if vae_eps else None)

    def __iter__(self):
        device, encoder = self.dist.device, self.encoder
        for step, x, y in self._loader():
            x = x.to(device, non_blocking=True)
            if encoder is not None:  # x becomes a draw from the VAE posterior (cached moments: mean | std)
                mean, std = encode_moments(encoder.vae, x, encoder.autocast_dtype) if encoder.cache is None \
                    else x.chunk(2, dim=1)
                x = mean
            t, drop, noise, vae_eps = self._draws(step, tuple(x.shape[1:]))
            if encoder is not None:
                x = sample_latents(mean, std, vae_eps.to(device))
            yield Batch(x=x, y=y.to(device), t=t.to(device), noise=noise.to(device), drop=drop.to(device), step=step)

    def __len__(self):
        return len(self.steps)


@dataclass(frozen=True)
class LatentCacheOptions:
    """--cache-latents [DIR]: encode the forget images once, and keep them (in DIR) for the next script."""
    enabled: bool = False
    cache_dir: Optional[str] = None
    num_workers: int = 0


def forget_latent_cache(options, forget_class, spec, dataset, vae, dist, logger):
    """With the cache enabled on a latent model: the forget set's VAE moments, encoded once (and kept in the
    cache folder when given, so that generate_fisher.py and forget.py encode them only once)."""
    if not options.enabled or vae is None:
        return None
    path = None
    if options.cache_dir:
        vae_name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(spec.vae)))
        path = os.path.join(options.cache_dir, f"forget-{forget_class}-{spec.image_size}-{vae_name}.pt")
    cache = LatentCache.build(dataset, vae, dist, batch_size=32, num_workers=options.num_workers, path=path)
    logger.info(f"{'Loaded' if cache.loaded else 'Cached'} the VAE latents of {len(dataset):,} forget images x 2 "
                f"flips" + (f" ({path})" if path else ""))
    return cache
