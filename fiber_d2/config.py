"""``add_fiber_config``: the one home of fiber_d2's config defaults.

Defaults reproduce FIBER-B (Swin-B + RoBERTa-base, fine-grained v2 fusion) as described in the
FIBER fine-grained spec. Derived yaml files under ``configs/`` change only a few keys.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_fiber_config", "ConfigError"]


class ConfigError(ValueError):
    """A one-line, user-facing configuration error: a key's value the run cannot have. The tools
    print it as one ``error:`` line (:mod:`fiber_d2.engine.cli`)."""


def add_fiber_config(cfg: CN) -> CN:
    """Add every fiber_d2 key (with its default) to a detectron2 config, in place.

    Args:
        cfg: a detectron2 config, usually ``detectron2.config.get_cfg()``.

    Returns:
        the same ``cfg``, for chaining. A config that already has the keys is returned as it is:
        a second call would set every key back to its default, values merged from a file included.
    """
    if "FIBER" in cfg.MODEL:
        return cfg
    _C = cfg
    # ------------------------------------------------------------------ model: overall
    _C.MODEL.META_ARCHITECTURE = "FIBER"
    _C.MODEL.BACKBONE.NAME = "build_fiber_swin_roberta_fpn_backbone"
    _C.MODEL.BACKBONE.FREEZE_AT = 0  # unused by FIBER; see MODEL.SWIN.FREEZE_AT
    # BGR 0-255 normalisation used by the fine-grained model (spec 6.3).
    _C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _C.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    # Load a MODEL.WEIGHTS file that leaves more than 1% of the model's parameters unfilled (by
    # default that is a one-line error listing the missing groups: another architecture?).
    _C.MODEL.WEIGHTS_PARTIAL_OK = False

    # ------------------------------------------------------------------ fusion
    _C.MODEL.FIBER = CN()
    # Number of fused (image block, text layer) pairs, counted from the top of both towers.
    _C.MODEL.FIBER.NUM_FUSION_LAYERS = 6
    # LayerNorm on the image-side cross-attention query (fine v3 and coarse stage: True; v2: False).
    _C.MODEL.FIBER.I2T_QUERY_NORM = False
    # Apply the last text layer's output LayerNorm on the fused path (coarse stage skips it: False).
    _C.MODEL.FIBER.FUSED_LAST_TEXT_NORM = True
    # Apply the last image output's norm on the fused path (coarse stage skips vit_model.norm: False).
    _C.MODEL.FIBER.FUSED_LAST_IMAGE_NORM = True
    # Fuse in the forward pass by default (False gives exactly the un-fused towers).
    _C.MODEL.FIBER.FUSION_ENABLED = True

    # ------------------------------------------------------------------ image tower (timm Swin)
    _C.MODEL.SWIN = CN()
    _C.MODEL.SWIN.PATCH_SIZE = 4  # patch-embedding stride
    _C.MODEL.SWIN.EMBED_DIM = 128  # stage-1 width (Swin-B)
    _C.MODEL.SWIN.DEPTHS = [2, 2, 18, 2]  # blocks per stage
    _C.MODEL.SWIN.NUM_HEADS = [4, 8, 16, 32]  # attention heads per stage
    _C.MODEL.SWIN.WINDOW_SIZE = 12  # attention window (pad-then-shift semantics)
    # Shift odd blocks even when a map fits in one window (detection Swin); coarse stage: False.
    _C.MODEL.SWIN.SHIFT_SINGLE_WINDOW = True
    _C.MODEL.SWIN.MLP_RATIO = 4.0  # MLP hidden width / block width
    _C.MODEL.SWIN.DROP_PATH_RATE = 0.4  # stochastic depth, linear over all blocks
    _C.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]  # stage outputs (strides 4-32)
    # Per-output LayerNorm ("norm0" is Identity in FIBER's RETINANET variant).
    _C.MODEL.SWIN.OUT_NORM = [False, True, True, True]
    # Freeze patch-embed (0) and also the first N stages (N>=1; more than the stages: all); -1 nothing
    # (fine-tuning), 1 = pretrain.
    _C.MODEL.SWIN.FREEZE_AT = -1
    _C.MODEL.SWIN.USE_CHECKPOINT = False  # activation checkpointing of stages 1-3 blocks
    # In inference (eval mode, no gradients), window self-attention through torch's
    # scaled_dot_product_attention (timm's fused path; same outputs to ~1e-6; FIBER-B backbone
    # forward 1.14x faster at 0.84x the memory on CPU). Training-mode forwards always use timm's
    # matmul + softmax (the original's computation, faster there): training is unchanged.
    _C.MODEL.SWIN.FUSED_ATTENTION = True
    _C.MODEL.SWIN.WEIGHTS = ""  # optional ImageNet Swin checkpoint (local path)

    # ------------------------------------------------------------------ text tower (HF RoBERTa)
    _C.MODEL.LANGUAGE_BACKBONE = CN()
    # Hub name or local dir of pretrained weights; "" builds from the values below, offline.
    _C.MODEL.LANGUAGE_BACKBONE.WEIGHTS = ""
    # Hub name or local dir of the tokenizer (a RobertaTokenizer directory).
    _C.MODEL.LANGUAGE_BACKBONE.TOKENIZER = "roberta-base"
    _C.MODEL.LANGUAGE_BACKBONE.HIDDEN_SIZE = 768  # width
    _C.MODEL.LANGUAGE_BACKBONE.NUM_LAYERS = 12  # encoder layers
    _C.MODEL.LANGUAGE_BACKBONE.NUM_HEADS = 12  # attention heads
    _C.MODEL.LANGUAGE_BACKBONE.INTERMEDIATE_SIZE = 3072  # FFN width
    _C.MODEL.LANGUAGE_BACKBONE.VOCAB_SIZE = 50265  # RoBERTa BPE vocabulary
    _C.MODEL.LANGUAGE_BACKBONE.MAX_POSITION_EMBEDDINGS = 514  # positions (pads use id 1)
    _C.MODEL.LANGUAGE_BACKBONE.TYPE_VOCAB_SIZE = 1  # token types
    _C.MODEL.LANGUAGE_BACKBONE.PAD_TOKEN_ID = 1  # RoBERTa pad id
    _C.MODEL.LANGUAGE_BACKBONE.HIDDEN_DROPOUT = 0.1  # hidden dropout
    _C.MODEL.LANGUAGE_BACKBONE.ATTENTION_DROPOUT = 0.1  # attention-probability dropout
    # LayerNorm eps (roberta-base; HF's default is 1e-12)
    _C.MODEL.LANGUAGE_BACKBONE.LAYER_NORM_EPS = 1e-5
    # random init only (an error with WEIGHTS): scale of the position table's init (0: no position
    # information at the start; see RobertaTextTower)
    _C.MODEL.LANGUAGE_BACKBONE.POSITION_INIT_SCALE = 1.0
    # random init only (an error with WEIGHTS): std of the text tower's normal init (RoBERTa's 0.02;
    # see RobertaTextTower)
    _C.MODEL.LANGUAGE_BACKBONE.INITIALIZER_RANGE = 0.02
    _C.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN = 256  # text is padded/truncated to this length
    _C.MODEL.LANGUAGE_BACKBONE.ATTN_IMPLEMENTATION = "sdpa"  # "sdpa" or "eager"
    _C.MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT = False  # activation checkpointing of text layers
    # recompute the fused text layers' cross-attention in the backward pass (same gradients)
    _C.MODEL.LANGUAGE_BACKBONE.CHECKPOINT_CROSS_ATTENTION = True
    _C.MODEL.LANGUAGE_BACKBONE.FREEZE = False  # freeze the whole text tower

    # ------------------------------------------------------------------ FPN additions
    _C.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    _C.MODEL.FPN.OUT_CHANNELS = 256
    _C.MODEL.FPN.DROP_BLOCK = True  # DropBlock on merged P3/P4 in training (FIBER default)
    _C.MODEL.FPN.DROP_BLOCK_PROB = 0.3  # drop probability
    _C.MODEL.FPN.DROP_BLOCK_SIZE = 3  # block side

    # ------------------------------------------------------------------ head (DyHead + grounding)
    _C.MODEL.DYHEAD = CN()
    _C.MODEL.DYHEAD.NUM_CONVS = 6  # DyConv blocks in the tower
    _C.MODEL.DYHEAD.CHANNELS = 256  # tower width
    _C.MODEL.DYHEAD.NUM_GROUPS = 16  # GroupNorm groups
    _C.MODEL.DYHEAD.USE_DYRELU = True  # task-aware DyReLU activation
    _C.MODEL.DYHEAD.USE_DFCONV = True  # modulated deformable convs (else plain 3x3)
    _C.MODEL.DYHEAD.USE_CHECKPOINT = False  # activation checkpointing of the tower
    # CPU deformable convs sample again in the backward pass instead of keeping 9 copies of the
    # input (same gradients; False: keep them, the older and hungrier path)
    _C.MODEL.DYHEAD.DFCONV_RECOMPUTE = True
    _C.MODEL.DYHEAD.NUM_CLASSES = 81  # sizes the frozen, unused cls_logits conv (80 outputs)
    _C.MODEL.DYHEAD.PRIOR_PROB = 0.01  # prior for cls_logits / bias0 init
    _C.MODEL.DYHEAD.LOG_SCALE = 0.0  # initial dot-product log temperature
    _C.MODEL.DYHEAD.CLAMP_DOT_PRODUCT = 50000.0  # clamp of token logits
    _C.MODEL.DYHEAD.TOKEN_ALPHA = 0.25  # token focal-loss alpha
    _C.MODEL.DYHEAD.TOKEN_GAMMA = 2.0  # token focal-loss gamma
    _C.MODEL.DYHEAD.TOKEN_LOSS_WEIGHT = 1.0  # weight of loss_dot_product_token
    _C.MODEL.DYHEAD.SCORE_AGG = "MEAN"  # token -> label score aggregation: MEAN or MAX

    # ------------------------------------------------------------------ anchors / ATSS / inference
    _C.MODEL.ATSS = CN()
    _C.MODEL.ATSS.ANCHOR_SIZES = [64, 128, 256, 512, 1024]  # one square anchor per location
    _C.MODEL.ATSS.ANCHOR_STRIDES = [8, 16, 32, 64, 128]  # P3-P7 strides
    _C.MODEL.ATSS.TOPK = 9  # candidates per level and GT
    _C.MODEL.ATSS.BBOX_REG_WEIGHTS = [10.0, 10.0, 5.0, 5.0]  # box coder weights
    _C.MODEL.ATSS.REG_LOSS_WEIGHT = 2.0  # GIoU loss weight
    _C.MODEL.ATSS.CENTERNESS_LOSS_WEIGHT = 1.0  # centerness BCE weight
    _C.MODEL.ATSS.INFERENCE_TH = 0.05  # score threshold before the centerness product
    _C.MODEL.ATSS.PRE_NMS_TOP_N = 1000  # candidates per level and image
    _C.MODEL.ATSS.NMS_TH = 0.6  # class-aware NMS IoU
    # final detections per image (per prompt chunk); 0 or less keeps every one after NMS
    _C.MODEL.ATSS.DETECTIONS_PER_IMG = 100

    # ------------------------------------------------------------------ coarse-grained stage
    _C.MODEL.COARSE = CN()
    _C.MODEL.COARSE.TEMPERATURE = 0.07  # initial learnable ITC temperature
    _C.MODEL.COARSE.QUEUE_SIZE = 4096  # ITC feature queue length
    _C.MODEL.COARSE.MLM_PROBABILITY = 0.15  # MLM token selection probability
    _C.MODEL.COARSE.LOSS_WEIGHTS = [1.0, 1.0, 1.0]  # ITC, ITM, MLM
    _C.MODEL.COARSE.LOSSES = ["itc", "itm", "mlm"]  # objectives switched on
    # ITM hard negatives: "queue" (the original: this process's batch, then the queued samples,
    # whose uint8 images and token ids the queue keeps: 4096 x 3 x S x S bytes, 1.8 GB at 384 px)
    # or "batch" (the batch gathered over all processes; no input queue)
    _C.MODEL.COARSE.ITM_NEGATIVES = "queue"
    # Switches for from-scratch towers (configs/Demo only); the defaults are the original's.
    _C.MODEL.COARSE.ITC_TEXT_POOL = "first"  # ITC text pooling: "first" (<s>) or "mean" (tokens)
    _C.MODEL.COARSE.QUEUE_INIT = "random"  # ITC queue: "random" (randn) or "empty" (filled part)
    _C.MODEL.COARSE.ITC_BATCH_NORM = False  # batch-standardise ITC embeddings before L2 norm
    # training: one image prefix (the blocks below the first fused one) per step for the ITC, MLM
    # and ITM passes and one text prefix of the captions for ITC and ITM, instead of one per pass
    # (the original). Same losses and gradients up to rounding without randomness in the prefixes;
    # with stochastic depth or dropout there the passes share one sample (FIBERCoarse docstring)
    _C.MODEL.COARSE.SHARE_PREFIX = False
    # VQA / NLVR2: batch-standardise cls_feats before the task head (a from-scratch Demo switch; see
    # FIBERFusedTask)
    _C.MODEL.COARSE.CLS_BATCH_NORM = False
    # VQA / NLVR2 with a frozen fused backbone (MODEL.SWIN.FREEZE_AT 4, LANGUAGE_BACKBONE.FREEZE, no
    # dropout): keep the backbone's part of each (image, text) input in memory (one vector of text +
    # image width per distinct input) and run the backbone only for inputs not seen before; same
    # outputs up to rounding (FIBERFusedTask.cls_feats_of). Captioning (MLE stage, frozen image
    # tower): the image tokens, per image
    _C.MODEL.COARSE.FEATURE_CACHE = False
    # with FEATURE_CACHE (VQA / NLVR2): also keep each distinct image's prefix (the image tower below
    # the first fused block: (S/16)^2 x C3 floats per image, 32 KB for the Demo at 128 px, ~2.6 MB for
    # FIBER-B at 576 px), so a new (image, text) input with a seen image runs only the text prefix and
    # the fused top; same outputs up to rounding
    _C.MODEL.COARSE.IMAGE_PREFIX_CACHE = False
    # the memory both caches may hold together, on the model's device (FIBER-B's image prefixes of
    # the 123K VQAv2 images would take 320 GB); once full they stop growing, with a warning
    _C.MODEL.COARSE.FEATURE_CACHE_MAX_MB = 2048

    # ------------------------------------------------------------------ input
    _C.INPUT.FORMAT = "BGR"
    _C.INPUT.MIN_SIZE_TRAIN = (480, 560, 640, 720, 800)
    _C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    _C.INPUT.MAX_SIZE_TRAIN = 1333
    _C.INPUT.MIN_SIZE_TEST = 800
    _C.INPUT.MAX_SIZE_TEST = 1333
    # the synthetic image sizes of tools/benchmark.py and tools/analyze_model.py are padded to this;
    # the models pad to their image tower's own multiple (Swin: patch size x 2 per patch merging, 32)
    _C.INPUT.SIZE_DIVISIBILITY = 32
    _C.INPUT.FLIP_PROB = 0.5  # horizontal flip probability (0 for referring expressions)
    _C.INPUT.IMAGE_SIZE = 384  # square resize of the coarse stage
    _C.INPUT.CAPTION_FLIP_PROB = 0.0  # horizontal flip of caption data (coarse pretraining: none)
    # dataset images (every mapper) are read as stored, as the original reads them and as the
    # public datasets' boxes and sizes are given; True turns each image upright by its EXIF
    # orientation tag first (detectron2's read_image), for datasets annotated on upright photos.
    # FIBERPredictor always turns a user's photo upright.
    _C.INPUT.EXIF_ORIENTATION = False
    # keep text padded to MAX_QUERY_LEN (the original); False: each batch runs at its longest
    # prompt rounded up to a multiple of 8 (same outputs on the real tokens, less compute)
    _C.INPUT.PAD_TO_MAX_QUERY_LEN = False
    # training transform of the fine-tuning tasks (VQA, NLVR2, retrieval, captioning; coarse spec
    # §5.2): "resize" (plain S x S bicubic, the original's "albef") or "albef_randaug" (crop, flip,
    # RandAugment N2 M7)
    _C.INPUT.VL_TRAIN_TRANSFORM = "resize"
    # the VQA / NLVR2 and caption (coarse stage, captioning) mappers: keep each image once read and
    # resized (S x S x 3 bytes per distinct image) instead of decoding it again for every question,
    # pair or caption; needs the deterministic transforms (VL_TRAIN_TRANSFORM "resize",
    # CAPTION_FLIP_PROB 0) in training
    _C.INPUT.VL_CACHE_IMAGES = False

    # ------------------------------------------------------------------ datasets / prompts
    _C.DATASETS.SEPARATION_TOKENS = ". "  # joins category names into a prompt
    _C.DATASETS.RANDOM_SAMPLE_NEG = 85  # negative categories sampled per detection sample
    _C.DATASETS.CONTROL_PROB = (0.0, 0.0, 1.0, 0.0)  # prompt-negative control probabilities
    _C.DATASETS.DISABLE_SHUFFLE = False  # keep category order in training prompts
    _C.DATASETS.FULL_PROMPT_TRAIN = False  # all categories every time (COCO fine-tuning)
    _C.DATASETS.TEST_PROMPT = []  # optional per-category prompt override for evaluation
    # The original's caption prompts (its DATASETS.CAPTION_PROMPT with USE_CAPTION_PROMPT True, e.g.
    # ODinW): a list literal of {"prefix": ..., "name": ..., "suffix": ...} per category in label
    # order; only the name is the category's span. Used at test time and in training with
    # FULL_PROMPT_TRAIN and DISABLE_SHUFFLE. "": category names.
    _C.DATASETS.CAPTION_PROMPT = ""
    # COCO-format sets registered when the config is loaded, usable in TRAIN / TEST:
    # [[name, json_file, image_root], ...]; a 4th element {category name: prompt text} overrides
    # that dataset's prompt words (README "Your own dataset").
    _C.DATASETS.REGISTER = []

    # ------------------------------------------------------------------ solver additions
    _C.SOLVER.OPTIMIZER = "ADAMW"  # ADAMW or SGD
    # images each process takes per forward / backward pass (the original's per_gpu_batchsize);
    # when SOLVER.IMS_PER_BATCH gives a process more, an iteration accumulates gradients over
    # IMS_PER_BATCH / (processes x IMS_PER_DEVICE) passes (fiber_d2.engine.train_step). 0: one pass
    _C.SOLVER.IMS_PER_DEVICE = 0
    # epoch-based schedule (fiber_d2.engine.schedule): when > 0, training sets MAX_ITER from this many
    # epochs of the training records as loaded (after the loader's filtering), STEPS at each of
    # STEP_FRACTIONS x MAX_ITER and, when WARMUP_FRACTION > 0, WARMUP_ITERS at that fraction
    _C.SOLVER.MAX_EPOCHS = 0  # whole epochs, as the original's recipes
    _C.SOLVER.STEP_FRACTIONS = ()
    _C.SOLVER.WARMUP_FRACTION = 0.0
    # torch's fused (one kernel per step) AdamW / SGD: the same update up to rounding, fewer passes
    # over the parameters; off keeps the for-loop arithmetic of the original recipes
    _C.SOLVER.FUSED = False
    # "fine" (per-tower LRs) or "coarse" (cross-modal / head LR multipliers)
    _C.SOLVER.PARAM_GROUP_RULE = "fine"
    _C.SOLVER.BETAS = (0.9, 0.999)  # AdamW betas
    _C.SOLVER.EPS = 1e-8  # AdamW epsilon
    _C.SOLVER.BIAS_LR_FACTOR = 2.0  # LR multiplier of every parameter whose name contains "bias"
    _C.SOLVER.WEIGHT_DECAY_BIAS = 0.0  # weight decay of those parameters
    _C.SOLVER.WEIGHT_DECAY_NORM_FACTOR = 1.0  # norm weights decay at WEIGHT_DECAY x this (FIBER: 1)
    _C.SOLVER.LR_MULT_CROSS_MODAL = 5.0  # coarse rule: LR multiplier of cross-modal parameters
    _C.SOLVER.LR_MULT_HEAD = 5.0  # coarse rule: LR multiplier of the MLM/ITM heads
    _C.SOLVER.LANG_LR = 1e-5  # learning rate of the whole text tower (incl. text-side fusion)
    _C.SOLVER.BACKBONE_BODY_LR_FACTOR = 1.0  # multiplier of BASE_LR for the image tower
    _C.SOLVER.WEIGHT_DECAY_SCHEDULE = False  # x0.1 weight decay before each LR step
    _C.SOLVER.WEIGHT_DECAY_SCHEDULE_RATIO = 0.667  # ... at this fraction of each milestone
    _C.SOLVER.EMA = CN()
    _C.SOLVER.EMA.ENABLED = False  # keep an exponential moving average of the weights
    _C.SOLVER.EMA.DECAY = 0.999  # EMA decay per iteration
    # evaluate the averaged weights during and at the end of training (the original's
    # USE_EMA_FOR_MONITOR); off: the raw weights, which the original evaluates and which
    # model_final.pth holds as "model" (--eval-only reads those); the average is saved as "model_ema"
    _C.SOLVER.EMA.USE_FOR_EVAL = False
    _C.SOLVER.MAX_NEG_PER_BATCH = 0.1  # skip batches whose share of box-less images exceeds this

    # ------------------------------------------------------------------ test additions
    # not read: each test dataset's evaluator_type chooses its evaluator; kept so that the configs
    # that runs wrote before its removal from the shipped configs still load
    _C.TEST.EVAL_TASK = "detection"
    # categories per prompt chunk (LVIS: 40); 0 or less: the predictor (FIBERPredictor) puts as many
    # names as fit in MAX_QUERY_LEN in each chunk (one prompt for a short vocabulary, several for a
    # long one), the evaluation's mapper writes one prompt (names past MAX_QUERY_LEN are never
    # predicted, with a warning)
    _C.TEST.CHUNKED_EVALUATION = -1
    # chunked prompts: image prefix once per image, text prefix once per chunk (cached until the
    # model next changes mode), fused top + FPN + head per chunk; False: whole model per chunk
    _C.TEST.PREFIX_REUSE = True
    _C.TEST.CHUNK_BATCH_SIZE = 4  # prompt chunks run as one batch with PREFIX_REUSE
    _C.TEST.AMP = False  # run inference under autocast (FIBER meta-architectures)
    _C.TEST.AMP_DTYPE = (
        "bfloat16"  # autocast dtype of TEST.AMP: bfloat16 (CPU/GPU) or float16 (GPU)
    )
    # The original's width of the score tensor of phrase labels (fine spec §4.2: 100 for Flickr30k,
    # 3000 for LVIS); not read: fiber_d2 sizes it by the prompt's labels, which gives the same scores.
    _C.TEST.MDETR_STYLE_AGGREGATE_CLASS_NUM = -1
    _C.TEST.FIXED_AP = False  # LVIS Fixed AP: top-k per class over the dataset, no per-image cap
    _C.TEST.FIXED_AP_TOPK = 10000  # detections kept per class with FIXED_AP
    _C.TEST.FLICKR_GT_TYPE = "separate"  # Flickr30k GT boxes: "separate" (ANY-box) or "merged"
    # An unreadable test image: False stops the evaluation with one line naming the file; True
    # evaluates it as an image without predictions (it still counts in every denominator).
    _C.TEST.UNREADABLE_IMAGE_AS_EMPTY = False

    # ------------------------------------------------------------------ process
    # Training on the CPU (glibc): allocations of at least this many MiB get their own mmap, so freed
    # activations leave the resident set (fiber_d2.engine.memory; FIBER-B 800x1333 forward + backward
    # peak 4.9 -> 3.8 GB for 1.14x the time); 0 keeps glibc's dynamic default, 32 is glibc's largest.
    # Applied by train_net (not --eval-only: inference only pays the time) and by
    # tools/benchmark.py's training tasks.
    _C.CPU_MMAP_THRESHOLD_MB = 8
    return cfg
