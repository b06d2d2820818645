"""All HVLFormer config keys, with their defaults (the paper's hyper-parameters for ViT-B/16).

``add_hvlformer_config(cfg)`` is the only place keys are added; YAML files under ``configs/`` override
them through ``_BASE_`` inheritance. detectron2's CfgNode refuses keys that do not exist here, so a
typo in a YAML file or on the command line is a clear error, not a silent no-op.
"""
import logging
import os
import tempfile
from typing import List

import yaml
from detectron2.config import CfgNode as CN


#: Keys that moved to the HierVL variant (issue 15): old key -> (new key, note). A config or command line
#: with an old key fails with "Key <old> was renamed to <new>; please update your config. Note: ...".
RENAMED_KEYS = {
    "MODEL.HVLFORMER.HIERVL": "MODEL.HIERVL",
    "MODEL.HVLFORMER.HIERVL.PROMPT_WEIGHT": "MODEL.HIERVL.PROMPT_WEIGHT",
    "MODEL.HVLFORMER.HIERVL.MASKED_VL_WEIGHT": "MODEL.HIERVL.MASKED_VL_WEIGHT",
    "MODEL.HVLFORMER.HIERVL.MASK_CONSISTENCY_WEIGHT": "MODEL.HIERVL.MASK_CONSISTENCY_WEIGHT",
    "MODEL.HVLFORMER.NUM_INSTANCE_QUERIES": "MODEL.HIERVL.NUM_INSTANCE_QUERIES",
    "MODEL.SEM_SEG_HEAD.TEXT_CROSS_ATTENTION": "MODEL.HIERVL.TEXT_CROSS_ATTENTION",
    "SEMI.UNLABELED_LOSS": "MODEL.HIERVL.UNLABELED_LOSS",
    "SEMI.ENTROPY_WEIGHT": "MODEL.HIERVL.ENTROPY_WEIGHT",
}
#: The values the renamed keys had by default before they moved: a config dumped by a run of an older version
#: (``output/*/config.yaml``) holds them, and they select nothing, so loading drops them with a warning.
RENAMED_KEY_OLD_DEFAULTS = {
    "MODEL.HVLFORMER.HIERVL.PROMPT_WEIGHT": 0.0,
    "MODEL.HVLFORMER.HIERVL.MASKED_VL_WEIGHT": 0.0,
    "MODEL.HVLFORMER.HIERVL.MASK_CONSISTENCY_WEIGHT": 1.0,
    "MODEL.HVLFORMER.NUM_INSTANCE_QUERIES": 0,
    "MODEL.SEM_SEG_HEAD.TEXT_CROSS_ATTENTION": False,
    "SEMI.UNLABELED_LOSS": "cmcr",
    "SEMI.ENTROPY_WEIGHT": 1.0,
}
_RENAME_NOTE = ("HierVL's options are read only by MODEL.META_ARCHITECTURE \"HierVL\"; HVLFormer has none of them "
                "(see configs/*/hiervl_*.yaml)")


def add_hvlformer_config(cfg: CN) -> None:
    """Add the HVLFormer keys to a detectron2 config (in place)."""
    for old, new in RENAMED_KEYS.items():
        cfg.register_renamed_key(old, new, message=_RENAME_NOTE)
    # ------------------------------------------------------------------ data
    # Dataset mapper for labeled training images ("hvlformer_semantic").
    cfg.INPUT.DATASET_MAPPER_NAME = "hvlformer_semantic"
    # Square training crop (H, W); Cityscapes uses 801.
    cfg.INPUT.CROP.SIZE = (512, 512)
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Random resize of the long side, as a ratio range of INPUT.RESIZE_BASE (UniMatch protocol).
    cfg.INPUT.RESIZE_RATIO_RANGE = (0.5, 2.0)
    # Long side that the resize ratio multiplies (VOC/COCO/ADE 512 ... Cityscapes 2048).
    cfg.INPUT.RESIZE_BASE = 512
    # Photometric distortion on labeled images (brightness / contrast / saturation / hue jitter).
    cfg.INPUT.COLOR_AUG_SSD = False
    # Pad the input to a multiple of this (the patch size divides it; 0 = no padding).
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    # Check every label map against the class count (values >= K that are not the ignore value fail).
    cfg.INPUT.VALIDATE_LABELS = True

    # Synthetic "shapes" dataset: registered as shapes_train / shapes_val under $DETECTRON2_DATASETS.
    cfg.DATASETS.SHAPES = CN()
    cfg.DATASETS.SHAPES.NUM_CLASSES = 6  # background + 5 shape classes
    cfg.DATASETS.SHAPES.IMAGE_SIZE = 128
    cfg.DATASETS.SHAPES.NUM_TRAIN = 400
    cfg.DATASETS.SHAPES.NUM_VAL = 50
    cfg.DATASETS.SHAPES.SEED = 0
    # Class table of the generator: "" = the shipped hvlformer/data/classes/shapes.json; a path or a file name
    # in that folder draws the same layouts with other colours / textures / shapes (one-factor experiments).
    cfg.DATASETS.SHAPES.CLASSES_FILE = ""

    # Labeled / unlabeled split files in the UniMatch / SemiVL format ("image_path [mask_path]" per line,
    # relative to the root of DATASET), registered as "split_labeled" / "split_unlabeled" when set
    # (hvlformer.data.register_split_files_from_cfg). The paper's seeded splits need none of this: they are
    # registered as "<dataset>_<count>_seed<seed>_labeled" / "..._unlabeled" (datasets/README.md).
    # Your own dataset, registered from the config (no code): {NAME}_labeled, {NAME}_unlabeled and,
    # with VAL_LIST, {NAME}_val. CLASSES_FILE is a JSON list of the K class names (label order); the
    # lists hold "image [mask]" lines relative to IMAGE_ROOT / MASK_ROOT; an empty UNLABELED_LIST means
    # every other image under IMAGE_ROOT. NAME "" = off.
    cfg.DATASETS.CUSTOM = CN()
    cfg.DATASETS.CUSTOM.NAME = ""
    cfg.DATASETS.CUSTOM.IMAGE_ROOT = ""
    cfg.DATASETS.CUSTOM.MASK_ROOT = ""
    cfg.DATASETS.CUSTOM.CLASSES_FILE = ""
    cfg.DATASETS.CUSTOM.LABELED_LIST = ""
    cfg.DATASETS.CUSTOM.UNLABELED_LIST = ""
    cfg.DATASETS.CUSTOM.VAL_LIST = ""
    cfg.DATASETS.SPLIT = CN()
    # Registered full training set whose images the files list, e.g. "voc_train"; masks come from it.
    cfg.DATASETS.SPLIT.DATASET = ""
    # Labeled list (registered as "split_labeled"); "" = none. Relative paths: to the working directory,
    # else to the dataset root.
    cfg.DATASETS.SPLIT.LABELED_FILE = ""
    # Unlabeled list (registered as "split_unlabeled"; a mask column is ignored); "" = none.
    cfg.DATASETS.SPLIT.UNLABELED_FILE = ""

    # Up-front dataset check (hvlformer.data.check): before the model is built, every dataset the run uses
    # must exist, and (ENABLED) every listed image and mask is read once, so that a corrupt file, a size
    # mismatch or a label value outside [0, K) stops the run at the start with the full list of bad files,
    # not hours into training. tools/check_dataset.py runs the same check alone.
    cfg.DATASETS.CHECK = CN()
    cfg.DATASETS.CHECK.ENABLED = True
    # Processes reading the files (0 = all CPU cores).
    cfg.DATASETS.CHECK.NUM_WORKERS = 0
    # Cache of the files that passed, keyed by the file list and each file's size and modification time, so a
    # second run is instant ("" = $HVLFORMER_CACHE_DIR, else ~/.cache/hvlformer).
    cfg.DATASETS.CHECK.CACHE_DIR = ""

    # DistributedDataParallel: set True when a config leaves parameters out of the loss (e.g. a zero weight).
    cfg.MODEL.DDP_FIND_UNUSED_PARAMETERS = False

    # ------------------------------------------------------------------ semi-supervised training
    # Labeled / unlabeled training sets. A non-empty TRAIN_UNLABELED selects the SemiSupervisedTrainer;
    # DATASETS.TRAIN is then unused.
    cfg.DATASETS.TRAIN_LABELED = ()
    cfg.DATASETS.TRAIN_UNLABELED = ()
    # Shapes: split shapes_train into NUM_LABELED labeled images (shapes_labeled) and the rest
    # (shapes_unlabeled), seeded by DATASETS.SHAPES.SEED; 0 = no split.
    cfg.DATASETS.SHAPES.NUM_LABELED = 0
    # Shapes: make one class rare among the labeled images (a class name, "" = off): walking the seeded order, an
    # image showing it is taken only while fewer than RARE_CLASS_LABELED_IMAGES labeled ones show it, so the
    # labeled split holds at most that many (the others go to shapes_unlabeled). Asks whether a class seen in one
    # or two labeled images keeps its name (issue 13 (a), docs/RESULTS.md).
    cfg.DATASETS.SHAPES.RARE_CLASS = ""
    cfg.DATASETS.SHAPES.RARE_CLASS_LABELED_IMAGES = 2

    cfg.SEMI = CN()
    # Target of the unlabeled views: "self" (the model's own original-view prediction, stop-gradient;
    # paper default) or "ema" (an exponential moving average of the model, UniMatch V2).
    cfg.SEMI.TEACHER = "self"
    # EMA decay d over parameters and floating-point buffers: teacher = d_t * teacher + (1 - d_t) * student,
    # d_t = min(d, 1 - 1 / (iteration + 1)) (UniMatch V2 warm-up: the plain average of the student so far).
    cfg.SEMI.EMA_DECAY = 0.996
    # Weight of L_CMCR (summed over the decoder layers) in the total loss (lambda_cmcr, paper eq. 6).
    cfg.SEMI.CMCR_WEIGHT = 5.0
    # Linear ramp-up of the unlabeled loss weight from 0 over the first N iterations (0 = full weight from
    # the start, as in the paper); during the ramp's first iteration the unlabeled views are skipped.
    cfg.SEMI.UNLABELED_RAMPUP_ITERS = 0
    # Supervised burn-in (Unbiased Teacher's BURN_UP_STEP; not in the paper): the unlabeled losses start at
    # this iteration (0 = from the start, as in the paper); the ramp-up, if any, counts from here. Before it
    # the unlabeled views are not computed, so the first pseudo-labels come from a model trained this long on
    # the labeled images (on shapes the semi runs' one-way square/cross confusion is set in their first
    # 100-300 steps; docs/DESIGN.md "Supervised burn-in").
    cfg.SEMI.UNLABELED_START_ITER = 0
    # Pseudo-label confidence threshold of l_mask (max class probability of the original view).
    cfg.SEMI.CONFIDENCE_THRESHOLD = 0.95
    # Diagnostic, not a method: l_mask's targets of the unlabeled images are their own hidden labels (one-hot;
    # 255 = no target) instead of the teacher's, the teacher still giving l_class's and l_align's targets. It
    # measures what the unlabeled objective can give with perfect pseudo-labels. Needs unlabeled records with
    # "hidden_sem_seg_file_name" (the `shapes` split; docs/DESIGN.md "Oracle pseudo-labels").
    cfg.SEMI.ORACLE_LABELS = False
    # Where the oracle's labels are l_mask targets (SEMI.ORACLE_LABELS only): "all" (every labelled pixel) or
    # "teacher" (only where the teacher's own confidence reaches SEMI.CONFIDENCE_THRESHOLD: its coverage with the
    # right names; separates the cost of the pixels the threshold drops from that of the wrong names).
    cfg.SEMI.ORACLE_COVERAGE = "all"
    # Image-guided refinement of the teacher's pseudo-labels (pixel-adaptive refinement, PAR of Ru et al., CVPR
    # 2022; not in the paper): before the threshold, the original view's class maps are propagated ITERATIONS
    # times between neighbouring image pixels of similar colour, so the image's own outlines complete the
    # teacher's at the pixels it is unsure about (docs/DESIGN.md "Pseudo-label refinement"). 0 = off (the paper).
    cfg.SEMI.LABEL_REFINEMENT_ITERATIONS = 0
    # Distances (pixels) of each pixel's 8 neighbours per dilation (PAR's 1-24 at 448-512 px, scaled to 96 px).
    cfg.SEMI.LABEL_REFINEMENT_DILATIONS = (1, 2, 4, 8)
    # Colour and position kernels' scale (PAR's w1), relative to the neighbours' colour / distance spread.
    cfg.SEMI.LABEL_REFINEMENT_COLOUR_SCALE = 0.3
    # Weight of the position kernel (nearer neighbours) beside the colour kernel (PAR's w2).
    cfg.SEMI.LABEL_REFINEMENT_POSITION_WEIGHT = 0.01
    # Distribution alignment of the pseudo-labels (ReMixMatch; not in the paper): the original view's class
    # probabilities are rescaled by (running labeled class frequencies) / (batch mean prediction) before
    # the argmax and the threshold, against self-training's drift towards the majority class of confusable
    # classes. The labeled frequencies are a running mean with this momentum (first batch copied).
    cfg.SEMI.DISTRIBUTION_ALIGNMENT = False
    cfg.SEMI.DISTRIBUTION_ALIGNMENT_MOMENTUM = 0.99
    # Dense CLIP guidance (SemiVL, ECCV 2024; not in the paper): the frozen CLIP's zero-shot patch labels
    # (E_I^0's dense embedding against the plain prompts) are a second l_mask target of the weak and strong
    # views, where CLIP is confident; a fixed anchor against self-training's drift. Its weight relative to
    # l_mask falls linearly from CLIP_GUIDANCE_WEIGHT at step 0 to CLIP_GUIDANCE_FINAL_WEIGHT at MAX_ITER
    # (both 0 = off, the paper; SemiVL's ratio: 0.2 -> 0). Needs MODEL.HVLFORMER.CLIP.PRETRAINED.
    cfg.SEMI.CLIP_GUIDANCE_WEIGHT = 0.0
    cfg.SEMI.CLIP_GUIDANCE_FINAL_WEIGHT = 0.0
    # CLIP's top class probability a pixel needs to be a guidance target (SemiVL: 0.9).
    cfg.SEMI.CLIP_GUIDANCE_THRESHOLD = 0.9
    # Mask pixels around a change of CLIP's label that are no guidance target (0 = SemiVL, all pixels): CLIP's
    # patch labels have blurred outlines, so with a margin the guidance anchors only the object interiors.
    cfg.SEMI.CLIP_GUIDANCE_EDGE_MARGIN = 0
    # The frozen CLIP renames the teacher's pseudo-labelled objects (not in SemiVL or the paper): each connected
    # region of confident pixels of one object class takes the object class most of CLIP's confident pixels there
    # name (more than half); the teacher's outline and confidence stay. Works with or without the guidance loss;
    # needs CMCR's teacher targets (HierVL's UNLABELED_LOSS 'entropy' has none: a config error).
    cfg.SEMI.CLIP_RELABEL_OBJECTS = False
    # The prompt of CLIP's classification ({} = the class name).
    cfg.SEMI.CLIP_GUIDANCE_TEMPLATE = "a photo of a {}."
    # Weights of the weak and strong views inside l_mask (and inside the CLIP guidance).
    cfg.SEMI.MASK_WEIGHT_WEAK = 0.5
    cfg.SEMI.MASK_WEIGHT_STRONG = 0.1
    # Ablation switches of the three CMCR terms.
    cfg.SEMI.MASK_CONSISTENCY = True
    cfg.SEMI.CLASS_CONSISTENCY = True
    cfg.SEMI.ALIGN_CONSISTENCY = True
    # l_class's strong term on images whose strong view holds a CutMix box: True compares them with the
    # original view like the others (eq. 3 as written); False leaves them out (the box changes which
    # objects the image holds; docs/DESIGN.md "l_class and CutMix").
    cfg.SEMI.CLASS_CONSISTENCY_MIXED = True
    # l_mask's gradient into the class probabilities of the weak and strong views' queries: True (eq. 2 as
    # written) lets pixel pseudo-labels change each query's per-image class decision; False detaches them in
    # l_mask, so l_mask moves only the masks (a diagnostic of how mask classification loses a class to a
    # confusable one; docs/DESIGN.md "l_mask and the class decision").
    cfg.SEMI.MASK_CONSISTENCY_CLASS_GRADIENT = True
    # Where l_mask compares the views with their targets: 0 = at the mask resolution (stride 4: every map as the
    # decoder predicts it, one hard target per 4 x 4 cell; the setting of the runs before this key); N > 0 = at N
    # pixels of the image drawn at random each step, every pixel when N >= H x W (paper supplement eq. 2 sums
    # over the H x W image pixels), the targets' and the views' maps read there bilinearly as inference
    # upsamples them (docs/DESIGN.md "l_mask at image pixels").
    cfg.SEMI.MASK_CONSISTENCY_PIXELS = 0
    # Weak view: brightness / contrast jitter, Gaussian blur probability and sigma range.
    cfg.SEMI.WEAK = CN()
    cfg.SEMI.WEAK.BRIGHTNESS = 0.1
    cfg.SEMI.WEAK.CONTRAST = 0.1
    cfg.SEMI.WEAK.BLUR_PROB = 0.5
    cfg.SEMI.WEAK.BLUR_SIGMA = (0.1, 0.5)
    # Strong view: ColorJitter(b, c, s, h) with probability JITTER_PROB, grayscale, blur, CutMix.
    cfg.SEMI.STRONG = CN()
    cfg.SEMI.STRONG.COLOR_JITTER = (0.5, 0.5, 0.5, 0.25)
    cfg.SEMI.STRONG.JITTER_PROB = 0.8
    cfg.SEMI.STRONG.GRAYSCALE_PROB = 0.2
    cfg.SEMI.STRONG.BLUR_PROB = 0.5
    cfg.SEMI.STRONG.BLUR_SIGMA = (0.1, 2.0)
    # CutMix from another unlabeled image of the batch (batch reversed): probability, box area
    # fraction range and aspect-ratio range.
    cfg.SEMI.STRONG.CUTMIX_PROB = 0.5
    cfg.SEMI.STRONG.CUTMIX_AREA = (0.02, 0.4)
    cfg.SEMI.STRONG.CUTMIX_ASPECT = (0.3, 1.0 / 0.3)
    # Rare-class sampling on the labeled loader (DAFormer): class probability softmax((1 - f_c) / T),
    # then an image with at least MIN_PIXELS pixels of that class.
    cfg.SEMI.RARE_CLASS_SAMPLING = CN()
    cfg.SEMI.RARE_CLASS_SAMPLING.ENABLED = False
    cfg.SEMI.RARE_CLASS_SAMPLING.TEMPERATURE = 0.01
    cfg.SEMI.RARE_CLASS_SAMPLING.MIN_PIXELS = 3000
    # Also evaluate the EMA teacher at every evaluation (results prefixed "teacher/").
    cfg.SEMI.EVAL_TEACHER = True

    # ------------------------------------------------------------------ solver
    # Global labeled / unlabeled images per step of the semi-supervised trainer (split over the GPUs).
    cfg.SOLVER.IMS_PER_BATCH_LABELED = 8
    cfg.SOLVER.IMS_PER_BATCH_UNLABELED = 8
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier of the CLIP vision encoder (fine-tuned at 0.1x).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Per-module learning-rate multipliers: [[parameter-name prefix, multiplier], ...]; the longest matching
    # prefix wins over BACKBONE_MULTIPLIER; 0 keeps those parameters at their initial values. E.g.
    # [["htqg.hqg.", 0.0]] freezes the HQG heads, so the textual queries stay the text's (docs/RESULTS.md).
    cfg.SOLVER.LR_MULTIPLIERS = []
    # Weight decay of normalisation layers, embeddings (position, level, query) and the learnable context.
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Exponent of the polynomial decay after warm-up ("WarmupPolyLR").
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # Mixed precision dtype when SOLVER.AMP.ENABLED: "bfloat16" (no scaler needed) or "float16".
    cfg.SOLVER.AMP.DTYPE = "bfloat16"

    # ------------------------------------------------------------------ backbone: CLIP vision tower
    cfg.MODEL.HVLFORMER = CN()
    cfg.MODEL.HVLFORMER.CLIP = CN()
    # open_clip architecture name; project configs in hvlformer/modeling/backbone/model_configs are
    # registered too (e.g. "HVL-Tiny-ViT" for CPU tests). Its activation must match the weights'
    # (QuickGELU for every "openai" tag, hence "ViT-B-16-quickgelu"); a mismatch is an error.
    cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME = "ViT-B-16-quickgelu"
    # open_clip pretrained tag (e.g. "openai"; needs network once) or a local checkpoint path;
    # "" = random initialisation (one warning is logged).
    cfg.MODEL.HVLFORMER.CLIP.PRETRAINED = ""
    # 0-based ViT blocks whose patch tokens feed the simple feature pyramid (ViT-B: 3,5,7,11;
    # EVA02-L: 7,11,15,23). Negative indices count from the last block.
    cfg.MODEL.HVLFORMER.CLIP.OUT_INDICES = [3, 5, 7, 11]
    # Norm inside the stride-4 branch of the pyramid: "GN", "LN", "BN", "SyncBN" (SyncBN falls back to BN
    # when torch.distributed is not initialised, so single-process CPU runs work).
    cfg.MODEL.HVLFORMER.CLIP.PYRAMID_NORM = "GN"
    # Recompute ViT blocks in the backward pass to save memory.
    cfg.MODEL.HVLFORMER.CLIP.GRADIENT_CHECKPOINTING = False
    # Keep a frozen copy E_I^0 of the PRETRAINED vision encoder for L^V (f_CLS vs f_CLS^0) and HierVL's
    # masked L_mask. It is taken from the weights PRETRAINED loads (never from MODEL.WEIGHTS), so it is the
    # same on every GPU; with PRETRAINED "" there is nothing to anchor to: L^V (and HierVL's L_mask) are
    # switched off with one warning.
    cfg.MODEL.HVLFORMER.CLIP.FROZEN_REFERENCE = True
    # True = every CLIP weight comes from MODEL.WEIGHTS (a trained HVLFormer checkpoint): PRETRAINED is not
    # loaded (nothing is downloaded) and no E_I^0 is built. Set by --eval-only, the demo and the predictor
    # when MODEL.WEIGHTS is given (hvlformer.modeling.clip_loader.clip_weights_from_checkpoint); training
    # keeps False so that E_I^0 is the pretrained encoder even when fine-tuning from MODEL.WEIGHTS.
    cfg.MODEL.HVLFORMER.CLIP.WEIGHTS_FROM_CHECKPOINT = False

    # ------------------------------------------------------------------ text side
    cfg.MODEL.HVLFORMER.TEXT = CN()
    # Learnable CoOp context tokens shared by all classes, inserted after SOT.
    cfg.MODEL.HVLFORMER.TEXT.NUM_CONTEXT = 8
    # Dataset-aware descriptions JSON (datasets/descriptions/<dataset>.json). "" = look up
    # datasets/descriptions/<name>.json for the training dataset's "descriptions_name" metadata;
    # if none exists the class-name fallback template is used.
    cfg.MODEL.HVLFORMER.TEXT.DESCRIPTIONS = ""
    # Descriptions per class that are averaged (R).
    cfg.MODEL.HVLFORMER.TEXT.NUM_DESCRIPTIONS = 4
    # Prompt used when no description file exists.
    cfg.MODEL.HVLFORMER.TEXT.FALLBACK_TEMPLATE = "a photo of a {}."
    # Prompt of the frozen reference embeddings T0 used by L^L ({} = class name, then attributes).
    cfg.MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE = "a clean origami of a {} with attributes: {}"

    # ------------------------------------------------------------------ HTQG (HQG + SRE)
    # Number of hierarchical query levels E.
    cfg.MODEL.HVLFORMER.NUM_QUERY_LEVELS = 3
    # Where the E x K queries come from: "text" (HQG on the class text embeddings, the paper) or
    # "learnable" (Mask2Former-style learned queries, the paper's Table 4 baseline row).
    cfg.MODEL.HVLFORMER.QUERY_SOURCE = "text"
    # LayerNorm after each HQG head, so the textual queries have the scale of Mask2Former's N(0, 1) query
    # embeddings (norm ~sqrt(D)); without it they are ~0.5 long next to the level positional embedding
    # (~sqrt(D)) and all K classes of a level attend alike (docs/DESIGN.md). False: the plain MLP_e.
    cfg.MODEL.HVLFORMER.QUERY_NORM = True
    # Start HQG's biases at zero: PyTorch's default bias is as large as the signal of a unit-norm text
    # embedding, so every class's query would start as nearly the same vector (docs/DESIGN.md). False: the
    # PyTorch default init (the runs before this key).
    cfg.MODEL.HVLFORMER.QUERY_ZERO_BIAS = True
    # Decoder width D.
    cfg.MODEL.HVLFORMER.HIDDEN_DIM = 256
    cfg.MODEL.HVLFORMER.SRE = CN()
    # "soft" (q * s_k), "threshold" (keep s_k > THRESHOLD), "none", "clip_zero_shot" (MODEL.META_ARCHITECTURE
    # "HierVL" only: ground-truth presence on labeled images; zero-shot CLIP presence from the frozen
    # pretrained encoder E_I^0 on unlabeled and test images, which needs CLIP.PRETRAINED also at evaluation;
    # without pretrained weights every class is kept).
    cfg.MODEL.HVLFORMER.SRE.MODE = "soft"
    # "threshold": the SRE score a class needs. "clip_zero_shot": the zero-shot class probability a class
    # needs RELATIVE to the most likely class, exp((cos_k - max cos) / TEMPERATURE) (several classes can pass).
    cfg.MODEL.HVLFORMER.SRE.THRESHOLD = 0.5
    # Temperature of the clip_zero_shot class probabilities: with THRESHOLD 0.5 a class is kept when its
    # cosine to the image is within 0.05 * ln 2 = 0.035 of the best class's.
    cfg.MODEL.HVLFORMER.SRE.TEMPERATURE = 0.05

    # ------------------------------------------------------------------ PTRM
    cfg.MODEL.HVLFORMER.PTRM = CN()
    # "ptrm" (paper), "cross_attention" (queries attend to pixels), "none" (Table 7b ablation).
    cfg.MODEL.HVLFORMER.PTRM.MODE = "ptrm"
    # Kernel and hidden width of the two convolutions producing W_T, W_V, W_F.
    cfg.MODEL.HVLFORMER.PTRM.KERNEL_SIZE = 7
    cfg.MODEL.HVLFORMER.PTRM.HIDDEN_CHANNELS = 16

    # ------------------------------------------------------------------ transformer decoder
    cfg.MODEL.HVLFORMER.TRANSFORMER_DECODER_NAME = "HVLTransformerDecoder"
    # Masked-attention layers N.
    cfg.MODEL.HVLFORMER.DEC_LAYERS = 9
    cfg.MODEL.HVLFORMER.NHEADS = 8
    cfg.MODEL.HVLFORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.HVLFORMER.DROPOUT = 0.0
    cfg.MODEL.HVLFORMER.PRE_NORM = False
    cfg.MODEL.HVLFORMER.ENFORCE_INPUT_PROJ = False
    # Query classifier: "linear" (paper) or "text" (cosine to t_k; allows a new vocabulary at inference).
    cfg.MODEL.HVLFORMER.CLASSIFIER = "linear"
    # Input size divisibility inside the model (padding for batching).
    cfg.MODEL.HVLFORMER.SIZE_DIVISIBILITY = 32

    # ------------------------------------------------------------------ losses
    cfg.MODEL.HVLFORMER.DEEP_SUPERVISION = True
    cfg.MODEL.HVLFORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.HVLFORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.HVLFORMER.MASK_WEIGHT = 5.0
    cfg.MODEL.HVLFORMER.DICE_WEIGHT = 5.0
    # Importance-sampled points for the mask losses (PointRend / Mask2Former).
    cfg.MODEL.HVLFORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.HVLFORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.HVLFORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    # L_reg = L^L + L^VL + L^V (language, vision-language, vision regularisation).
    cfg.MODEL.HVLFORMER.REG_LANGUAGE_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.REG_VISION_LANGUAGE_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.REG_VISION_WEIGHT = 1.0
    # Temperature of the pixel-text logits of L^VL.
    cfg.MODEL.HVLFORMER.REG_VL_TEMPERATURE = 0.07
    # Diversity of the query levels (L_div) and the SRE presence BCE.
    cfg.MODEL.HVLFORMER.DIV_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.SRE_WEIGHT = 1.0

    # ------------------------------------------------------------------ HierVL variant
    # Read only by MODEL.META_ARCHITECTURE "HierVL" (hvlformer/modeling/meta_arch/hiervl.py), the earlier
    # version of the method; the defaults are HierVL's. Its zero-shot relevance is MODEL.HVLFORMER.SRE.MODE
    # "clip_zero_shot" (HierVL only).
    cfg.MODEL.HIERVL = CN()
    # Learnable instance queries (DQTD) appended after the E*K textual ones, Hungarian-matched.
    cfg.MODEL.HIERVL.NUM_INSTANCE_QUERIES = 100
    # Pixel tokens cross-attend to the K textual cluster centres after each deformable encoder layer.
    cfg.MODEL.HIERVL.TEXT_CROSS_ATTENTION = True
    # L_prompt = L_topo + L_anchor on the learned class embeddings (0 = off).
    cfg.MODEL.HIERVL.PROMPT_WEIGHT = 1.0
    # Masked vision-language regularisation L_align + MASK_CONSISTENCY_WEIGHT * L_mask (0 = off); L_mask
    # needs the pretrained E_I^0 (MODEL.HVLFORMER.CLIP.PRETRAINED).
    cfg.MODEL.HIERVL.MASKED_VL_WEIGHT = 1.0
    cfg.MODEL.HIERVL.MASK_CONSISTENCY_WEIGHT = 1.0
    # Loss on unlabeled images: "entropy" (HierVL's entropy minimisation) or "cmcr" (HVLFormer's CMCR, with
    # the SEMI keys), and the weight of the entropy loss.
    cfg.MODEL.HIERVL.UNLABELED_LOSS = "entropy"
    cfg.MODEL.HIERVL.ENTROPY_WEIGHT = 1.0

    # ------------------------------------------------------------------ pixel decoder (Mask2Former keys)
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    # Deformable encoder layers M and their attention shape.
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_NHEADS = 8
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD = 1024
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DROPOUT = 0.0
    # MSDeformAttn core: "auto" (Triton kernels for CUDA tensors, PyTorch grid_sample elsewhere; the env
    # variable HVLFORMER_MSDEFORM_ATTN_IMPL overrides "auto"), "pytorch" (always the reference) or "triton".
    cfg.MODEL.SEM_SEG_HEAD.MSDEFORM_ATTN_IMPL = "auto"

    # ------------------------------------------------------------------ thesis methods (all OFF by default)
    # The thesis "Towards Image Semantic Segmentation: From Context to Language" (chapters 3-5) as optional
    # modules (hvlformer/modeling/thesis/, docs/THESIS_MODULES.md). Off = the paper's HVLFormer unchanged.
    # CAA, Class-Aware Affinity (chapter 3) on one pixel-decoder level.
    cfg.MODEL.HVLFORMER.CAA = CN()
    cfg.MODEL.HVLFORMER.CAA.ENABLED = False
    # Index into the pixel decoder's multi-scale outputs (strides 32/16/8): 2 = stride 8 (the thesis's level);
    # the P x P affinity costs 4 * (H*W/stride^2)^2 bytes per map (64 MiB at 512x512, stride 8).
    cfg.MODEL.HVLFORMER.CAA.LEVEL = 2
    # Reduced width D' (0 = CONVS_DIM // 2).
    cfg.MODEL.HVLFORMER.CAA.REDUCED_DIM = 0
    # Norm of the 1x1 reductions ("GN", "BN", "SyncBN", "" = none).
    cfg.MODEL.HVLFORMER.CAA.NORM = "GN"
    # Loss weights: affinity BCE (eq. 3.9, lambda_2) and auxiliary coarse CE (eq. 3.10, lambda_3).
    cfg.MODEL.HVLFORMER.CAA.AFFINITY_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.CAA.AUX_WEIGHT = 0.4

    # ECAC, Extended Context-Aware Classifier (chapter 4): a dense classifier on the mask features.
    cfg.MODEL.HVLFORMER.ECAC = CN()
    cfg.MODEL.HVLFORMER.ECAC.ENABLED = False
    # EMA momentum mu of the class memory (eq. 4.2): M <- (1 - mu) M + mu Z.
    cfg.MODEL.HVLFORMER.ECAC.MOMENTUM = 0.1
    # Memory updates (labeled training iterations) before the memory loss L_M starts (Sec. 4.2.4).
    cfg.MODEL.HVLFORMER.ECAC.MEMORY_START_ITER = 1000
    # Temperature of the cosine memory logits of L_M.
    cfg.MODEL.HVLFORMER.ECAC.MEMORY_TEMPERATURE = 0.1
    # Re-weighting exponent rho of eq. 4.14 (0 = plain CE, 1 = inverse class frequency).
    cfg.MODEL.HVLFORMER.ECAC.REWEIGHT_RHO = 0.5
    # Temperature of the teacher -> student KL (eq. 4.12); the loss is scaled by its square.
    cfg.MODEL.HVLFORMER.ECAC.KL_TEMPERATURE = 1.0
    # Per-class scale-and-offset calibration of student and teacher logits (eqs. 4.9 / 4.10).
    cfg.MODEL.HVLFORMER.ECAC.CALIBRATION = True
    # Loss weights of eq. 4.21: L_rceS, L_rceT, L_M, alpha L_KL, beta L_iv.
    cfg.MODEL.HVLFORMER.ECAC.STUDENT_CE_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.ECAC.TEACHER_CE_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.ECAC.MEMORY_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.ECAC.KL_WEIGHT = 1.0
    cfg.MODEL.HVLFORMER.ECAC.INTRA_VARIANCE_WEIGHT = 50.0
    # Inference: weight of the calibrated student's probabilities mixed into the mask-classification scores
    # ((1 - w) * scores + w * softmax(O_s); 0 = ECAC acts through its training losses only).
    cfg.MODEL.HVLFORMER.ECAC.INFERENCE_WEIGHT = 0.5

    # LSMSeg (chapter 5): category filter, class-level refinement of the textual queries, visual fusion.
    cfg.MODEL.HVLFORMER.LSMSEG = CN()
    # Category Filtering Module: per image keep the top-k classes by image-text cost before decoding
    # (inference; acts only when the vocabulary has more than k classes).
    cfg.MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER = False
    cfg.MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K = 32
    # Linear-attention block over the class dimension applied to the textual queries (eq. 5.8).
    cfg.MODEL.HVLFORMER.LSMSEG.CLASS_REFINEMENT = False
    cfg.MODEL.HVLFORMER.LSMSEG.CLASS_REFINEMENT_HEADS = 4
    # Visual feature fusion (eq. 5.1): w * CLIP + (1 - w) * Proj(frozen second encoder).
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION = False
    # Registered name in AUXILIARY_ENCODER_REGISTRY (hvlformer.modeling.thesis.feature_fusion).
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION_ENCODER = "TinyConvEncoder"
    # state_dict file of the second encoder ("" only for encoders that allow random weights).
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION_WEIGHTS = ""
    # Backbone outputs that are fused.
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION_LEVELS = ["res3", "res4", "res5"]
    # Initial fusion weight w (the thesis: 0.5).
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION_INIT_WEIGHT = 0.5
    # Class prompts: "descriptions" (the dataset-aware descriptions, paper) or "attributes" (the thesis's
    # size, shape, texture, colour sentences joined in that order into one prompt per class, Sec. 5.2.3; the
    # table comes from the descriptions file's "attribute_descriptions" or from attributes/<file name> next to
    # it, shipped for shapes and voc), or "names" (FALLBACK_TEMPLATE with the class name only, whatever the
    # descriptions file: the paper's Table 5 "fixed prompt, class name only" and its Table 4 baseline, TQDM).
    cfg.MODEL.HVLFORMER.TEXT.PROMPT_STYLE = "descriptions"

    # ------------------------------------------------------------------ test
    # Keep the weights of the best evaluation as OUTPUT_DIR/model_best.pth (detectron2's BestCheckpointer; its
    # metric and step in model_best.json, restored on --resume). METRIC: a key of the evaluation results as
    # metrics.json writes them, e.g. "sem_seg/mIoU" or, for the EMA teacher, "teacher/sem_seg/mIoU"; "" = off.
    # Evaluations come every TEST.EVAL_PERIOD steps and at the end. Why: with few labels the supervised model
    # peaks early and falls after (docs/RESULTS.md, 10 shape kinds: by up to 10 mIoU).
    cfg.TEST.BEST_CHECKPOINT = CN()
    cfg.TEST.BEST_CHECKPOINT.METRIC = ""
    # "max" (mIoU, accuracy) or "min" (a loss).
    cfg.TEST.BEST_CHECKPOINT.MODE = "max"
    cfg.TEST.SLIDING_WINDOW = CN()
    # Sliding-window inference (count-matrix averaging); whole-image inference when False.
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.CROP_SIZE = 512
    cfg.TEST.SLIDING_WINDOW.STRIDE = 341
    # Pixel-text alignment of the supplement (eq. 10): the model's inference outputs carry the per-level
    # mean cosine similarity between the refined textual queries and the per-pixel embeddings, and the
    # evaluator reports it (PixelTextAlignmentEvaluator, "pixel_text_alignment" in the results).
    cfg.TEST.PIXEL_TEXT_ALIGNMENT = False
    # Open-vocabulary inference (hvlformer/modeling/clip_ensemble.py, docs/DESIGN.md "Open vocabulary"): each
    # query's class probabilities are mixed with the pretrained CLIP's own classification of its mask (E_I^0's
    # dense embedding pooled under the mask, against plain prompts), FC-CLIP's geometric ensemble. Helps names
    # outside the training vocabulary (demo --vocabulary). Needs MODEL.HVLFORMER.CLIP.PRETRAINED.
    cfg.TEST.CLIP_ENSEMBLE = CN()
    cfg.TEST.CLIP_ENSEMBLE.ENABLED = False
    # CLIP's exponent for the classes of the training vocabulary (FC-CLIP's alpha; 0 = the decoder alone for
    # them, and then an unseen name rarely wins a pixel: docs/RESULTS.md, (e)).
    cfg.TEST.CLIP_ENSEMBLE.SEEN_WEIGHT = 0.4
    # CLIP's exponent for every other name (FC-CLIP's beta; 1 = CLIP alone).
    cfg.TEST.CLIP_ENSEMBLE.UNSEEN_WEIGHT = 0.8
    # Prompt of CLIP's classification ({} = class name): the plain prompt CLIP is used with.
    cfg.TEST.CLIP_ENSEMBLE.TEMPLATE = "a photo of a {}."
    # Softmax temperature of CLIP's cosine similarities; 0 = the CLIP model's own learned logit scale.
    cfg.TEST.CLIP_ENSEMBLE.TEMPERATURE = 0.0
    # The unit CLIP classifies: "mask" (each query's mask, FC-CLIP), "pixel" (the same rule on each pixel's
    # class distribution, so a name can win part of a mask, e.g. a shape left under the background's mask) or
    # "pixel_unseen" (per pixel, but CLIP only decides how much goes to names never trained; the split among
    # the training names stays the decoder's, so with the training vocabulary alone it equals the decoder).
    cfg.TEST.CLIP_ENSEMBLE.LEVEL = "mask"
    # Inference scale outside the benchmark protocols: the demo, HVLFormerPredictor and the evaluation of
    # datasets that are not built-in benchmarks (DATASETS.CUSTOM, register_sem_seg_folder, your own). The
    # image is resized so that its short side is MIN_SIZE and its long side at most MAX_SIZE; the
    # prediction is resized back to the input size. A 4000x3000 photo at full resolution costs minutes
    # and GBs even with the tiny model and shows a dot-lattice artefact the model never saw in training.
    # The built-in benchmarks (VOC, COCO-81, ADE20K, Cityscapes, shapes) keep the paper's protocol: the
    # original size, with TEST.SLIDING_WINDOW where the config enables it (Cityscapes).
    cfg.TEST.INFERENCE_SCALE = CN()
    # Short side in pixels; -1 = the training crop's short side (min of INPUT.CROP.SIZE); 0 = original size.
    cfg.TEST.INFERENCE_SCALE.MIN_SIZE = -1
    # Cap of the long side in pixels; -1 = the longest side seen in training
    # (INPUT.RESIZE_BASE * max(INPUT.RESIZE_RATIO_RANGE)); 0 = no cap.
    cfg.TEST.INFERENCE_SCALE.MAX_SIZE = -1


def drop_old_default_keys(loaded: dict) -> List[str]:
    """Remove, in place, the renamed keys (:data:`RENAMED_KEYS`) that hold their old default value.

    ``loaded`` is a config as a nested dict (``CfgNode.load_yaml_with_base``). Returns the dotted keys removed.
    A renamed key with any other value stays, so that merging it fails with the rename message.
    """
    removed = []
    for key, default in RENAMED_KEY_OLD_DEFAULTS.items():
        *parents, leaf = key.split(".")
        node = loaded
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and leaf in node and node[leaf] == default:
            del node[leaf]
            removed.append(key)
    # an emptied MODEL.HVLFORMER.HIERVL node goes as well
    hvlformer = loaded.get("MODEL", {}).get("HVLFORMER", {})
    if isinstance(hvlformer, dict) and hvlformer.get("HIERVL", None) == {}:
        del hvlformer["HIERVL"]
        removed.append("MODEL.HVLFORMER.HIERVL")
    return removed


def merge_config_file(cfg: CN, path: str) -> None:
    """``cfg.merge_from_file(path)``, accepting the configs that older versions dumped with their runs.

    Renamed keys that hold their old default (nothing selected) are dropped with one warning; a renamed key
    set to anything else still fails, naming its new place.
    """
    loaded = cfg.load_yaml_with_base(path, allow_unsafe=True)
    removed = drop_old_default_keys(loaded)
    if not removed:
        cfg.merge_from_file(path)
        return
    logging.getLogger(__name__).warning(
        "%s: ignoring keys of an older version that hold their old default and were renamed: %s", path,
        ", ".join(removed))
    with tempfile.TemporaryDirectory() as tmp:
        pruned = os.path.join(tmp, os.path.basename(path))
        with open(pruned, "w") as f:
            yaml.safe_dump(_plain(loaded), f)
        cfg.merge_from_file(pruned)


def _plain(value):
    """Tuples as lists, recursively, so that ``yaml.safe_dump`` writes them (merging turns them back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
