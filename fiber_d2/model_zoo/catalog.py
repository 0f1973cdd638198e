"""The released FIBER checkpoints: one table, the single source of truth.

Each :class:`ZooEntry` names the original file (as published by the FIBER authors), the fiber_d2 config
it belongs with, the tokenizer it needs, and the numbers the original reports for it. The README's
"Model zoo" table is generated from :data:`ENTRIES` by :func:`markdown_table` (a test checks that the
README agrees).

Sources: the original repository's READMEs (``fine_grained/README.md``, ``coarse_grained/README.md``) as
recorded in the project's spec (``fine_grained.md`` §5-6, ``coarse_grained.md`` §5.7). The fine-grained
files are published under generic names (``model_0072500.pth``); each entry therefore has its own
folder under ``FIBER_D2_HOME``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["ZooEntry", "ENTRIES", "entry", "names", "markdown_table"]

_FINE_URL = "https://penzhanwu2v2.blob.core.windows.net/amulet/projects/aish-intern/amlt-results/"
_COARSE_URL = "https://datarelease.blob.core.windows.net/fiber/coarse_grained/"


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint.

    Attributes:
        name: model-zoo name (``fiber_d2.model_zoo.get("fiber-b/coco")``).
        stage: "fine" (the ``FIBER`` detector) or "coarse" (``FIBERCoarse``).
        file_name: the original file name, or "" when the original authors did not release it.
        config: the fiber_d2 config, relative to the repository root.
        tokenizer: the tokenizer the text tower needs (hub name or ``builtin:shapes``).
        task: what the model does, in a few words.
        reported: metric -> number as the original reports it (the README's wording).
        url: where the original publishes the file ("" when not released or built locally).
        extra_defaults: ``project_dir:package.function``: a project (imported, which registers
            its models) and its function adding config keys; ``project_dir:package`` for a project
            without config keys of its own; or "".
        local_copies: repository-relative paths where the file may already be (e.g. written by
            ``make demo``), searched after ``FIBER_D2_HOME``.
        how_to_get: a hint for files that are not downloaded (e.g. "run `make demo`").
    """

    name: str
    stage: str
    file_name: str
    config: str
    tokenizer: str
    task: str
    reported: Dict[str, str] = field(default_factory=dict)
    url: str = ""
    extra_defaults: str = ""
    local_copies: Tuple[str, ...] = ()
    how_to_get: str = ""

    @property
    def released(self) -> bool:
        return bool(self.file_name)

    @property
    def folder(self) -> str:
        """Folder under ``FIBER_D2_HOME`` holding this entry's file (the name, '/' -> '_')."""
        return self.name.replace("/", "_")


_RETRIEVAL = "projects/Retrieval:retrieval.add_retrieval_config"

ENTRIES: Tuple[ZooEntry, ...] = (
    # ------------------------------------------------------------------ built here
    ZooEntry(
        name="demo",
        stage="fine",
        file_name="model_final.pth",
        config="configs/Demo/fine_tiny.yaml",
        tokenizer="builtin:shapes",
        task="tiny detector on the built-in shapes world (CPU)",
        # make demo on the Intel Xeon kind (README, "Demo status")
        reported={"bbox AP / AP50": "57.0 / 62.8", "grounding R@1": "84.0"},
        local_copies=("output/demo/fine/model_final.pth",),
        how_to_get="run `make demo` in a clone of the fiber_d2 repository (writes "
        "output/demo/fine/model_final.pth)",
    ),
    # ------------------------------------------------------------------ fine-grained (detector)
    ZooEntry(
        name="fiber-b/fine-pretrain",
        stage="fine",
        file_name="fiber_coarse_then_fine.pth",
        config="configs/FIBER-B/fine_pretrain.yaml",
        tokenizer="roberta-base",
        task="fine-grained pre-training (Flickr30k, MixedNoCOCO, Objects365), v2 fusion",
        reported={"Flickr30k R@1/5/10 (val)": "87.1 / 96.1 / 97.4 (paperswithcode)"},
        how_to_get="linked (as 'last_checkpoint') from the original fine_grained/README.md, "
        "Model Zoo (Pre-trained), first row",
    ),
    ZooEntry(
        name="fiber-b/fine-pretrain-refexp",
        stage="fine",
        file_name="fiber_coarse_then_fine_for_refexp.pth",
        config="configs/FIBER-B/fine_pretrain_refexp.yaml",
        tokenizer="roberta-base",
        task="fine-grained pre-training on refexp-cleaned data, v3 fusion (RefCOCO init)",
        how_to_get="linked (as 'last_checkpoint') from the original fine_grained/README.md, "
        "Model Zoo (Pre-trained), second row",
    ),
    ZooEntry(
        name="fiber-b/coco",
        stage="fine",
        file_name="model_0072500.pth",
        config="configs/FIBER-B/coco.yaml",
        tokenizer="roberta-base",
        task="COCO detection, fine-tuned",
        reported={"COCO AP": "58.4"},
        url=_FINE_URL + "7348946846.71243-448f49cf-ee95-4e05-98a7-bb1b9d1fba37/model_0072500.pth",
    ),
    ZooEntry(
        name="fiber-b/lvis",
        stage="fine",
        file_name="model_0080000.pth",
        config="configs/FIBER-B/lvis_minival.yaml",
        tokenizer="roberta-base",
        task="LVIS detection, fine-tuned",
        reported={"LVIS minival Fixed AP": "56.9"},
        url=_FINE_URL + "7348869400.04055-e20796f8-0bb0-4161-b583-c4224c74a34a/model_0080000.pth",
    ),
    ZooEntry(
        name="fiber-b/refcoco",
        stage="fine",
        file_name="model_0120000.pth",
        config="configs/FIBER-B/refcoco.yaml",
        tokenizer="roberta-base",
        task="RefCOCO referring expressions, v3 fusion",
        reported={"acc val / testA / testB": "90.68 / 92.59 / 87.26"},
        url=_FINE_URL + "7347243520.00025-0bbf3f78-15b6-4d92-a2cf-6c2b7189b742/model_0120000.pth",
    ),
    ZooEntry(
        name="fiber-b/refcoco+",
        stage="fine",
        file_name="model_0125000.pth",
        config="configs/FIBER-B/refcocoplus.yaml",
        tokenizer="roberta-base",
        task="RefCOCO+ referring expressions, v3 fusion",
        reported={"acc val / testA / testB": "85.74 / 90.13 / 79.38"},
        url=_FINE_URL + "7347226779.12763-fd8d9559-6f4b-4e74-a1ce-460fe0c83054/model_0125000.pth",
    ),
    ZooEntry(
        name="fiber-b/refcocog",
        stage="fine",
        file_name="",
        config="configs/FIBER-B/refcocog.yaml",
        tokenizer="roberta-base",
        task="RefCOCOg referring expressions, v3 fusion",
        reported={"acc val / test": "87.11 / 87.32"},
        how_to_get="not released by the original authors (their README: TODO); fine-tune with "
        "tools/train_net.py --config-file configs/FIBER-B/refcocog.yaml",
    ),
    # ------------------------------------------------------------------ coarse-grained
    ZooEntry(
        name="fiber-b/coarse-pretrain",
        stage="coarse",
        file_name="fiber_pretrain.ckpt",
        config="configs/FIBER-B/coarse_pretrain.yaml",
        tokenizer="roberta-base",
        task="coarse pre-training (COCO, VG, SBU, GCC): ITC + ITM + MLM",
        url=_COARSE_URL + "fiber_pretrain.ckpt",
    ),
    ZooEntry(
        name="fiber-b/coco-retrieval-itc",
        stage="coarse",
        file_name="fiber_coco_irtr_itc.ckpt",
        config="projects/Retrieval/configs/coco_itc.yaml",
        tokenizer="roberta-base",
        task="COCO image-text retrieval, ITC",
        reported={"COCO 5K IR@1 / TR@1": "58.01 / 75.38"},
        url=_COARSE_URL + "fiber_coco_irtr_itc.ckpt",
        extra_defaults=_RETRIEVAL,
    ),
    ZooEntry(
        name="fiber-b/coco-retrieval-itm",
        stage="coarse",
        file_name="fiber_coco_irtr_itm.ckpt",
        config="projects/Retrieval/configs/coco_itm.yaml",
        tokenizer="roberta-base",
        task="COCO image-text retrieval, ITM",
        reported={"COCO 5K IR@1 / TR@1": "59.03 / 75.14"},
        url=_COARSE_URL + "fiber_coco_irtr_itm.ckpt",
        extra_defaults=_RETRIEVAL,
    ),
    ZooEntry(
        name="fiber-b/f30k-retrieval-itc",
        stage="coarse",
        file_name="fiber_f30k_irtr_itc.ckpt",
        config="projects/Retrieval/configs/f30k_itc.yaml",
        tokenizer="roberta-base",
        task="Flickr30k image-text retrieval, ITC",
        reported={"F30K 1K IR@1 / TR@1": "81.44 / 92.90"},
        url=_COARSE_URL + "fiber_f30k_irtr_itc.ckpt",
        extra_defaults=_RETRIEVAL,
    ),
    ZooEntry(
        name="fiber-b/f30k-retrieval-itm",
        stage="coarse",
        file_name="fiber_f30k_irtr_itm.ckpt",
        config="projects/Retrieval/configs/f30k_itm.yaml",
        tokenizer="roberta-base",
        task="Flickr30k image-text retrieval, ITM",
        reported={"F30K 1K IR@1 / TR@1": "84.10 / 95.10"},
        url=_COARSE_URL + "fiber_f30k_irtr_itm.ckpt",
        extra_defaults=_RETRIEVAL,
    ),
    ZooEntry(
        name="fiber-b/vqa",
        stage="coarse",
        file_name="fiber_vqa.ckpt",
        config="projects/VQA/configs/vqav2.yaml",
        tokenizer="roberta-base",
        task="VQAv2 (projects/VQA; its answer vocabulary comes from the VQAv2 annotations or "
        "VQA.ANSWER_VOCAB)",
        reported={"VQAv2 test-std": "78.46"},
        url=_COARSE_URL + "fiber_vqa.ckpt",
        extra_defaults="projects/VQA:vqa.add_vqa_config",
    ),
    ZooEntry(
        name="fiber-b/nlvr2",
        stage="coarse",
        file_name="fiber_nlvr2.ckpt",
        config="projects/NLVR2/configs/nlvr2.yaml",
        tokenizer="roberta-base",
        task="NLVR2 (projects/NLVR2)",
        reported={"NLVR2 test-P acc": "85.52"},
        url=_COARSE_URL + "fiber_nlvr2.ckpt",
        extra_defaults="projects/NLVR2:nlvr2",
    ),
    ZooEntry(
        name="fiber-b/coco-caption",
        stage="coarse",
        file_name="fiber_coco_caption.ckpt",
        config="projects/Captioning/configs/coco_cider.yaml",
        tokenizer="roberta-base",
        task="COCO captioning (projects/Captioning), after the CIDEr-D stage",
        reported={"CIDEr (Karpathy test)": "144.4"},
        url=_COARSE_URL + "fiber_coco_caption.ckpt",
        extra_defaults="projects/Captioning:captioning.add_captioning_config",
    ),
)

_BY_NAME = {e.name: e for e in ENTRIES}


def names(stage: Optional[str] = None) -> List[str]:
    """Model-zoo names, optionally of one stage ("fine" / "coarse")."""
    return [e.name for e in ENTRIES if stage is None or e.stage == stage]


def entry(name: str) -> ZooEntry:
    """The entry called ``name``.

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown model-zoo name {name!r}; known names: {', '.join(names())}"
        ) from None


def markdown_table() -> str:
    """The README's "Model zoo" table (markdown), generated from :data:`ENTRIES`."""
    rows = [
        "| name | stage | original file | config | tokenizer | reported by the original |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in ENTRIES:
        file_cell = f"`{e.file_name}`" if e.file_name else "not released"
        reported = "; ".join(f"{k}: {v}" for k, v in e.reported.items()) or "—"
        rows.append(
            f"| `{e.name}` | {e.stage} | {file_cell} | `{e.config}` | `{e.tokenizer}` | {reported} |"
        )
    return "\n".join(rows)
