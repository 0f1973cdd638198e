"""The built-in shapes world: a tiny, deterministic grounding dataset and its tokenizer.

Images show coloured geometric shapes (4 colours x 3 kinds, small or large) on a plain
background. Every image holds a *distractor pair* (the same kind in two colours), so finding
"the red circle" needs the text. From one scene the generator writes, per split:

* ``annotations/det_{split}.json``: COCO detection, 12 categories "red circle", ..., ids 1-12;
* ``annotations/grounding_{split}.json``: MDETR grounding format (one image entry per
  caption with ``caption``, ``original_img_id``, ``tokens_positive_eval``; annotations with
  ``bbox``, ``tokens_positive``, ``category_id`` 1), e.g. "a small red circle left of a blue
  square", "the circles and a yellow square" (a phrase with several boxes);
* ``annotations/refexp_{split}.json``: MDETR refexp format (one entry per expression, one
  box, ``original_id``), e.g. "the large blue circle above the green square";
* ``annotations/captions_{split}.jsonl``: one json line per image, ``file_name`` + ``captions``.

Images are PNG under ``images/{split}/``. The same seed gives byte-identical json.
The shapes tokenizer (byte-level BPE, :data:`SHAPES_VOCAB_SIZE` tokens, RoBERTa special ids)
does not depend on the seed and is cached under ``<root>/tokenizer``.
Default root: ``$DETECTRON2_DATASETS/shapes`` when that variable is set, else
``$FIBER_D2_HOME/shapes`` (default ``~/.cache/fiber_d2/shapes``), never the current directory;
:func:`ensure_shapes_world` generates it on first use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw

from ..checkpoint.safe_io import write_whole

__all__ = [
    "COLORS",
    "SHAPE_KINDS",
    "SIZES",
    "CATEGORY_NAMES",
    "SHAPES_VOCAB_SIZE",
    "SPLITS",
    "shapes_root",
    "shapes_root_in",
    "shapes_files",
    "generate_shapes",
    "ensure_shapes_world",
    "write_json",
    "build_shapes_tokenizer",
    "ensure_shapes_tokenizer",
]

logger = logging.getLogger(__name__)

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 220),
    "yellow": (240, 200, 20),
}
SHAPE_KINDS: Tuple[str, ...] = ("circle", "square", "triangle")
SIZES: Dict[str, Tuple[int, int]] = {"small": (12, 18), "large": (26, 36)}  # side range, px
CATEGORY_NAMES: Tuple[str, ...] = tuple(f"{c} {k}" for c in COLORS for k in SHAPE_KINDS)
SHAPES_VOCAB_SIZE = 1000
"""Vocabulary size of the shapes tokenizer (the Demo config's VOCAB_SIZE)."""
SPLITS: Tuple[str, ...] = ("train", "val")
_VERSION = 1
_RELATIONS = ("left of", "right of", "above", "below")
_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

# Generic English coverage for the tokenizer, so text outside the world still gets sensible
# merges (COCO class words, common words); the world's own words dominate the merge counts.
_GENERIC_WORDS = """
person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign
parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard
surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange
broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet tv laptop
mouse remote keyboard cell phone microwave oven toaster sink refrigerator book clock vase
scissors teddy hair drier toothbrush man woman child boy girl people group street road building
house tree grass sky water beach field room kitchen window door wall floor city park snow
white black brown gray pink purple dark bright little big tall short long wide old new young
standing sitting walking running holding looking playing riding eating wearing carrying next
near front behind top bottom side middle center corner inside outside under over between
around across along through into onto from with without while where there here this that
these those what which who whose when how why because before after during each every some
many much more most other another such only same different first second third last one two
three four five six seven eight nine ten several few all both either neither none nothing
something anything everything someone everyone time year day week month morning evening night
way thing part place case point number world area home hand eye face head body word picture
photo image scene view shape object color line edge small large round flat thin thick heavy
light soft hard smooth empty full open closed clean dirty hot cold warm cool wet dry fast
slow high low close far early late good bad great best better worse nice pretty beautiful
happy sad is are was were be been being have has had do does did will would can could should
may might must shall and or but not no yes if then than so as at by for of on in to up down
out off again further once also just very too quite rather really almost always never often
sometimes usually perhaps maybe a an the it its he she they we you i me him her them us my
your his their our make made take took see saw seen come came go went gone get got give gave
find found think know knew tell told ask work seem feel try leave call keep let begin help
show shown hear play run move live believe bring happen write sit stand lose pay meet include
continue set learn change lead understand watch follow stop create speak read allow add spend
grow offer remember love consider appear buy wait serve die send expect build stay fall cut
reach kill remain suggest raise pass sell require report decide pull
"""


@dataclass
class _Shape:
    colour: str
    kind: str
    size: str
    box: Tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive corner, pixels)

    @property
    def category_id(self) -> int:
        return CATEGORY_NAMES.index(f"{self.colour} {self.kind}") + 1

    @property
    def centre(self) -> Tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

    def xywh(self) -> List[int]:
        x1, y1, x2, y2 = self.box
        return [x1, y1, x2 - x1, y2 - y1]


def shapes_root(root: Union[str, os.PathLike, None] = None) -> Path:
    """The shapes world directory: ``root``, else ``$DETECTRON2_DATASETS/shapes`` when that
    variable is set, else ``$FIBER_D2_HOME/shapes`` (default ``~/.cache/fiber_d2/shapes``): generated
    files never land in the current directory.

    Args:
        root: explicit directory, or None for the default.

    Returns:
        the directory path (not created).
    """
    if root is not None:
        return Path(root)
    if os.environ.get("DETECTRON2_DATASETS"):
        return Path(os.environ["DETECTRON2_DATASETS"]) / "shapes"
    from ..model_zoo.weights import fiber_d2_home  # local import: model_zoo is above data

    return fiber_d2_home() / "shapes"


def shapes_root_in(datasets_root: Optional[str]) -> Path:
    """The shapes world directory of a datasets root, as every ``register_all_*(root)`` uses it:
    ``<datasets_root>/shapes`` when a root is given, else :func:`shapes_root`'s default.

    Args:
        datasets_root: the root passed to a registration function, or None.

    Returns:
        the directory path (not created).
    """
    return shapes_root(None if datasets_root is None else os.path.join(datasets_root, "shapes"))


def shapes_files(root: Union[str, os.PathLike], split: str) -> Dict[str, str]:
    """Paths of one split's files (they exist once the world is generated).

    Args:
        root: the world directory.
        split: "train" or "val".

    Returns:
        dict with keys ``image_root``, ``det``, ``grounding``, ``refexp``, ``captions``.
    """
    if split not in SPLITS:
        raise KeyError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    ann = root / "annotations"
    return {
        "image_root": str(root / "images" / split),
        "det": str(ann / f"det_{split}.json"),
        "grounding": str(ann / f"grounding_{split}.json"),
        "refexp": str(ann / f"refexp_{split}.json"),
        "captions": str(ann / f"captions_{split}.jsonl"),
    }


def _overlaps(a: Sequence[int], b: Sequence[int], margin: int) -> bool:
    return not (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def _make_scene(rng: random.Random, width: int, height: int) -> List[_Shape]:
    colours = list(COLORS)
    while True:
        kind = rng.choice(SHAPE_KINDS)
        c1, c2 = rng.sample(colours, 2)
        wanted = [(c1, kind), (c2, kind)]
        wanted += [(rng.choice(colours), rng.choice(SHAPE_KINDS)) for _ in range(rng.randint(1, 4))]
        shapes: List[_Shape] = []
        for colour, k in wanted:
            for _ in range(60):
                size = rng.choice(list(SIZES))
                if any((s.colour, s.kind, s.size) == (colour, k, size) for s in shapes):
                    continue
                side = rng.randint(*SIZES[size])
                x, y = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
                box = (x, y, x + side, y + side)
                if not any(_overlaps(box, s.box, margin=3) for s in shapes):
                    shapes.append(_Shape(colour, k, size, box))
                    break
        if len(shapes) >= 3 and shapes[0].kind == shapes[1].kind == kind:
            return shapes


def _draw(shapes: Sequence[_Shape], width: int, height: int, background: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (background, background, background))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x1, y1, x2, y2 = s.box
        fill = COLORS[s.colour]
        if s.kind == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:
            draw.polygon([((x1 + x2 - 1) / 2.0, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
    return image


def _describe(shape: _Shape, shapes: Sequence[_Shape], article: str, rng: random.Random) -> str:
    """A phrase naming ``shape`` uniquely: size is added when colour + kind is ambiguous."""
    twins = [s for s in shapes if (s.colour, s.kind) == (shape.colour, shape.kind)]
    words = [article]
    if len(twins) > 1 or rng.random() < 0.5:
        words.append(shape.size)
    return " ".join(words + [shape.colour, shape.kind])


def _relation(a: _Shape, b: _Shape) -> str:
    """Where ``a`` is relative to ``b`` (image coordinates, y down)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


class _Caption:
    """A caption under construction: text plus the char span of each phrase."""

    def __init__(self) -> None:
        self.text = ""
        self.phrases: List[Tuple[List[int], List[_Shape]]] = []

    def add(self, text: str, shapes: Optional[List[_Shape]] = None) -> "_Caption":
        start = len(self.text)
        self.text += text
        if shapes:
            self.phrases.append(([start, len(self.text)], shapes))
        return self


def _grounding_caption(shapes: List[_Shape], rng: random.Random) -> _Caption:
    pair = shapes[:2]
    a = rng.choice(pair) if rng.random() < 0.6 else rng.choice(shapes)
    b = rng.choice([s for s in shapes if s is not a])
    style = rng.random()
    if style < 0.2:
        kind = pair[0].kind
        group = [s for s in shapes if s.kind == kind]
        others = [s for s in shapes if s.kind != kind]
        if others:
            b = rng.choice(others)
            cap = _Caption().add(f"the {kind}s", group).add(" and ")
            return cap.add(_describe(b, shapes, "a", rng), [b])
    cap = _Caption().add(_describe(a, shapes, "a", rng), [a])
    cap.add(" and " if style < 0.45 else f" {_relation(a, b)} ")
    return cap.add(_describe(b, shapes, "a", rng), [b])


def _refexp(shapes: List[_Shape], rng: random.Random) -> _Caption:
    a = rng.choice(shapes[:2]) if rng.random() < 0.7 else rng.choice(shapes)
    b = rng.choice([s for s in shapes if s is not a])
    cap = _Caption().add(_describe(a, shapes, "the", rng), [a])
    return cap.add(f" {_relation(a, b)} ").add(_describe(b, shapes, "the", rng))


def _scene_caption(shapes: List[_Shape]) -> str:
    ordered = sorted(shapes, key=lambda s: s.centre)
    names = [f"a {s.size} {s.colour} {s.kind}" for s in ordered]
    return "a picture of " + ", ".join(names[:-1]) + " and " + names[-1]


def write_json(path: Path, obj, indent: Optional[int] = None) -> None:
    """Write ``obj`` as json to a temporary file renamed over ``path``: no reader sees half a file,
    and a process killed while writing leaves ``path`` as it was."""
    with write_whole(str(path), "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)


def _generate_split(
    root: Path,
    split: str,
    rng: random.Random,
    num_images: int,
    image_size: Tuple[int, int],
    captions_per_image: int,
    refexps_per_image: int,
) -> None:
    files = shapes_files(root, split)
    image_dir = Path(files["image_root"])
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = [
        {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORY_NAMES)
    ]
    det = {"images": [], "annotations": [], "categories": categories}
    ground = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    refexp = {"images": [], "annotations": [], "categories": categories}
    caption_lines = []
    for index in range(num_images):
        image_id = index + 1
        width, height = rng.randint(*image_size), rng.randint(*image_size)
        shapes = _make_scene(rng, width, height)
        file_name = f"{image_id:06d}.png"
        _draw(shapes, width, height, rng.randint(225, 250)).save(image_dir / file_name)
        size = {"file_name": file_name, "height": height, "width": width}
        det["images"].append({"id": image_id, **size})
        for s in shapes:
            det["annotations"].append(
                {
                    "id": len(det["annotations"]) + 1,
                    "image_id": image_id,
                    "bbox": s.xywh(),
                    "area": s.xywh()[2] * s.xywh()[3],
                    "category_id": s.category_id,
                    "iscrowd": 0,
                }
            )
        texts = [_scene_caption(shapes)]
        for sentence_id in range(captions_per_image):
            cap = _grounding_caption(shapes, rng)
            for _ in range(5):  # avoid repeating a caption of this image
                if cap.text not in texts:
                    break
                cap = _grounding_caption(shapes, rng)
            texts.append(cap.text)
            entry_id = len(ground["images"]) + 1
            ground["images"].append(
                {
                    **size,
                    "id": entry_id,
                    "caption": cap.text,
                    "dataset_name": "shapes",
                    "tokens_negative": [[0, len(cap.text)]],
                    "sentence_id": sentence_id,
                    "original_img_id": image_id,
                    "tokens_positive_eval": [[span] for span, _ in cap.phrases],
                }
            )
            for span, members in cap.phrases:
                for s in members:
                    ground["annotations"].append(
                        {
                            "id": len(ground["annotations"]) + 1,
                            "image_id": entry_id,
                            "bbox": s.xywh(),
                            "area": s.xywh()[2] * s.xywh()[3],
                            "category_id": 1,
                            "iscrowd": 0,
                            "tokens_positive": [span],
                        }
                    )
        for _ in range(refexps_per_image):
            cap = _refexp(shapes, rng)
            span, (target,) = cap.phrases[0]
            entry_id = len(refexp["images"]) + 1
            refexp["images"].append(
                {
                    **size,
                    "id": entry_id,
                    "original_id": image_id,
                    "caption": cap.text,
                    "dataset_name": "refshapes",
                    "tokens_negative": [[0, len(cap.text)]],
                }
            )
            refexp["annotations"].append(
                {
                    "id": entry_id,
                    "image_id": entry_id,
                    "bbox": target.xywh(),
                    "area": target.xywh()[2] * target.xywh()[3],
                    "category_id": target.category_id,
                    "iscrowd": 0,
                    "tokens_positive": [span],
                }
            )
        line = {"file_name": file_name, "image_id": image_id, "height": height, "width": width}
        caption_lines.append(json.dumps({**line, "captions": texts}, ensure_ascii=False))
    Path(files["det"]).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(files["det"]), det)
    write_json(Path(files["grounding"]), ground)
    write_json(Path(files["refexp"]), refexp)
    Path(files["captions"]).write_text("\n".join(caption_lines) + "\n", encoding="utf-8")


def generate_shapes(
    root: Union[str, os.PathLike],
    *,
    seed: int = 0,
    num_train: int = 256,
    num_val: int = 64,
    image_size: Tuple[int, int] = (128, 160),
    captions_per_image: int = 2,
    refexps_per_image: int = 2,
) -> Path:
    """Write a shapes world (images + all annotation files of both splits) under ``root``.

    Args:
        root: output directory (created; existing files are overwritten).
        seed: random seed; the same seed writes byte-identical json.
        num_train: number of training images.
        num_val: number of validation images.
        image_size: (min, max) of each image side in pixels, drawn per image and side.
        captions_per_image: grounding captions per image (MDETR entries).
        refexps_per_image: referring expressions per image.

    Returns:
        the root path. ``meta.json`` is written last and marks a complete world.
    """
    lo, hi = image_size
    if lo < 96 or hi < lo:
        raise ValueError(f"image_size {image_size} must satisfy 96 <= min <= max")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train={num_train} and num_val={num_val} must be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
        rng = random.Random(seed * 1000 + split_index)
        _generate_split(root, split, rng, count, (lo, hi), captions_per_image, refexps_per_image)
    meta = {
        "version": _VERSION,
        "seed": seed,
        "num_images": {"train": num_train, "val": num_val},
        "image_size": [lo, hi],
        "categories": list(CATEGORY_NAMES),
    }
    write_json(root / "meta.json", meta)
    logger.info("wrote shapes world (%d train, %d val images) to %s", num_train, num_val, root)
    return root


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on the atomic renames only
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_shapes_world(root: Union[str, os.PathLike, None] = None, **kwargs) -> Path:
    """Generate the shapes world under ``root`` unless it is already complete.

    Safe with several processes (data-loader workers, DDP ranks): generation runs under a
    file lock into a temporary directory whose contents are renamed into place.

    Args:
        root: world directory (default :func:`shapes_root`: ``$DETECTRON2_DATASETS/shapes``
            when that variable is set, else ``$FIBER_D2_HOME/shapes``).
        kwargs: forwarded to :func:`generate_shapes` (seed, sizes).

    Returns:
        the root path.
    """
    root = shapes_root(root)
    if (root / "meta.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock"):
        if (root / "meta.json").exists():
            return root
        tmp = Path(tempfile.mkdtemp(prefix=".generating-", dir=root))
        try:
            generate_shapes(tmp, **kwargs)
            for name in ("images", "annotations"):
                if (root / name).exists():  # leftovers of an interrupted run
                    shutil.rmtree(root / name)
                os.replace(tmp / name, root / name)
            os.replace(tmp / "meta.json", root / "meta.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _tokenizer_corpus() -> Iterator[str]:
    """World sentences (every relation between every pair of categories) + generic words."""
    for size in SIZES:
        for c1 in COLORS:
            for k1 in SHAPE_KINDS:
                for rel in _RELATIONS + ("and",):
                    for c2 in COLORS:
                        for k2 in SHAPE_KINDS:
                            yield f"a {size} {c1} {k1} {rel} the {c2} {k2}"
    for k in SHAPE_KINDS:
        yield f"the {k}s and a picture of {k}s. " + ". ".join(CATEGORY_NAMES)
    words = _GENERIC_WORDS.split()
    for i in range(0, len(words), 12):
        yield " ".join(words[i : i + 12])


def build_shapes_tokenizer(out_dir: Union[str, os.PathLike]):
    """Train the shapes byte-level BPE tokenizer and save it as a RoBERTa tokenizer.

    Args:
        out_dir: directory written with ``save_pretrained``; afterwards
            ``AutoTokenizer.from_pretrained(out_dir)`` works offline.

    Returns:
        the ``transformers`` fast RoBERTa tokenizer: <s>=0, <pad>=1, </s>=2, <unk>=3,
        <mask>=4, :data:`SHAPES_VOCAB_SIZE` tokens in all.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _tokenizer_corpus(),
        vocab_size=SHAPES_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=_SPECIALS,
        show_progress=False,
    )
    vocab = bpe.get_vocab()
    if len(vocab) != SHAPES_VOCAB_SIZE:
        raise RuntimeError(
            f"shapes tokenizer has {len(vocab)} tokens, expected {SHAPES_VOCAB_SIZE}"
        )
    merges = json.loads(bpe._tokenizer.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges)
    for i, token in enumerate(_SPECIALS):
        if tokenizer.convert_tokens_to_ids(token) != i:
            raise RuntimeError(f"special token {token} did not get id {i}")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def ensure_shapes_tokenizer(root: Union[str, os.PathLike, None] = None) -> Path:
    """Build the shapes tokenizer under ``<root>/tokenizer`` unless it exists.

    Args:
        root: world directory (default :func:`shapes_root`: ``$DETECTRON2_DATASETS/shapes``
            when that variable is set, else ``$FIBER_D2_HOME/shapes``); only the tokenizer is
            written, not the images.

    Returns:
        the tokenizer directory.
    """
    target = shapes_root(root) / "tokenizer"
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
    try:
        build_shapes_tokenizer(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").exists():  # not a concurrent builder's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("shapes tokenizer ready at %s", target)
    return target
