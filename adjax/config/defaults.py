"""Shared configuration defaults; `configs/*.py` import and override these.

Every field a run reads is declared here, so a misspelt command-line
override (`--config.epocs=3`) is an error rather than silently ignored.
The defaults are the paper's settings (SPEC sections 5-7).
"""

from __future__ import annotations

import ml_collections

# Data sets the protocol evaluates on after training on MVTec AD (SPEC section 1).
MVTEC_TARGETS = ("visa", "mpdd", "btad", "isic", "clinicdb", "colondb", "tn3k")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "adjax"            # run name; the default workdir is runs/<name>
  c.mode = "train"            # train (then evaluate) | evaluate | predict
  c.workdir = ""              # default: runs/<name>
  c.init_from = ""            # a trained workdir whose head parameters start this run
  # A workdir remembers its training config; resuming it (or evaluating its
  # head) under a config that differs in a result-changing field is refused
  # unless this is "allow".
  c.resume_mismatch = "refuse"   # refuse | allow
  c.seed = 0                  # head initialisation, data order, random towers
  # One switch for the release's quirks (SPEC section 9): text columns mixed,
  # exact GELU in the text tower, VisA masks thresholded at > 0, and a first
  # optimiser step with learning rate 0.
  c.reference_quirks = True

  c.backbone = ml_collections.ConfigDict()
  c.backbone.family = "dinov3"      # a row of adjax.models.backbones.FAMILIES: dinov3 | dinov2
  c.backbone.variant = "vitl16"     # the family's VARIANTS name; "" = the checkpoint's own
  c.backbone.checkpoint = "checkpoints/dinov3_vitl16"   # converted directory
  # Hugging Face repository a missing backbone.checkpoint is fetched from,
  # converted and verified at start ("" = never fetch). DINOv3 is gated: accept
  # its licence on the hub and log in (hf auth login, or HF_TOKEN) first.
  c.backbone.hub_id = "facebook/dinov3-vitl16-pretrain-lvd1689m"
  c.backbone.random_init = False    # random weights of the variant (demo, benchmarks)
  c.backbone.layers = (5, 11, 17, 23)   # tapped blocks; () = the family's default four
  c.backbone.dtype = "bfloat16"     # matmul dtype; parameters, norms and softmax stay float32

  c.text = ml_collections.ConfigDict()
  c.text.variant = "vit-l-14"       # CLIP text architecture (clip_text.VARIANTS), for random_init
  c.text.checkpoint = "checkpoints/clip_vitl14_336_text"   # converted directory
  c.text.hub_id = "openai/clip-vit-large-patch14-336"   # where a missing text.checkpoint is fetched from ("" = never)
  c.text.random_init = False        # random weights of text.variant (demo, benchmarks)
  c.text.activation = ""            # "" = the checkpoint's (quick_gelu), or gelu under the quirks
  c.text.display_names = ml_collections.ConfigDict()  # folder name -> readable object name
  c.text.cache_dir = ""             # default: <workdir>/text_cache

  c.data = ml_collections.ConfigDict()
  c.data.train = "mvtec_ad"         # a data set name, or a path to a folder in MVTec layout
  c.data.targets = ",".join(MVTEC_TARGETS)   # comma-separated names or paths
  c.data.data_dir = "data/tfds"     # where prepared data sets live
  # Where each benchmark's raw download lies (read once, when it is prepared).
  c.data.manual_dirs = ml_collections.ConfigDict({
      "mvtec_ad": "data/mvtec_anomaly_detection",
      "visa": "data/VisA_20220922",
      "mpdd": "data/MPDD",
      "btad": "data/BTech_Dataset_transformed",
      "isic": "data/ISIC",
      "clinicdb": "data/CVC-ClinicDB",
      "colondb": "data/CVC-ColonDB",
      "tn3k": "data/TN3K",
  })
  # Generated demo data (adjax.data.synthetic): when `root` is set, families
  # a and b are written there on first use.
  c.data.demo = ml_collections.ConfigDict()
  c.data.demo.root = ""
  c.data.demo.seed = 0
  c.data.demo.image_size = 256
  c.data.demo.per_category = 30
  c.data.demo.train_per_category = 0   # normal training images per category (<cat>/train/good)
  c.data.worker_count = 0           # grain worker processes decoding images (0: threads only)
  c.data.prefetch = 2               # batches decoded ahead
  c.data.skip_bad_files = False     # unreadable images become warnings, not errors
  # A benchmark with a published archive (mvtec_ad, visa) that is neither
  # prepared nor under data.manual_dirs is downloaded into it, after its
  # licence is printed: only with data.download=True, or a yes at a terminal.
  c.data.download = False
  # Per data set, "URL#sha256=HEX" replaces the published source (a mirror
  # or a local copy); "" = the table in adjax/fetch/sources.py.
  c.data.sources = ml_collections.ConfigDict({"mvtec_ad": "", "visa": ""})

  c.image_size = 512
  c.batch_size = 64                 # global batch (all processes and devices)
  c.epochs = 100                    # passes over the training set
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-5  # AdamW peak learning rate
  c.optimizer.b1 = 0.9              # AdamW first-moment decay
  c.optimizer.b2 = 0.999            # AdamW second-moment decay
  c.optimizer.weight_decay = 0.01   # AdamW decoupled weight decay
  c.optimizer.warmup_fraction = 0.03   # linear warm-up over this fraction of the steps

  c.feature_cache = "none"          # none | memory | disk
  c.feature_cache_dtype = "bfloat16"   # storage precision of cached features: bfloat16 | float32
  c.feature_cache_dir = ""          # default: <workdir>/feature_cache

  c.checkpoint_every_steps = 200    # save a resumable checkpoint this often (and at the end)
  c.checkpoints_to_keep = 2         # newest checkpoints kept
  c.log_every_steps = 10            # metrics.jsonl / TensorBoard / progress line cadence

  c.train = ml_collections.ConfigDict()
  # True: train on a set without anomalous images (the losses then only push
  # every image and pixel toward "normal"; no defect is learned).
  c.train.allow_no_anomalies = False

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = True             # evaluate after training
  c.eval.batch_size = 16            # global evaluation batch
  c.eval.image_score = "global"     # global | max | mean
  c.eval.fpr_limit = 0.3            # AUPRO integrates the PRO curve up to this FPR
  c.eval.aupro_zsad = False         # also report the ZSAD papers' AUPRO variant
  c.eval.heatmaps_per_category = 4  # heatmap panels drawn per category
  c.eval.report_panels = 2          # highest- and lowest-scoring panels per category (HTML report)
  c.eval.force = False              # evaluate a finished run again
  # True: this evaluation's F1-max thresholds replace the deployment record of
  # its eval.scoring mode (<workdir>/thresholds.json for zero_shot,
  # thresholds.<mode>.json otherwise; every evaluation writes its own beside
  # its results; a training run's evaluation creates thresholds.json when none exists).
  c.eval.set_thresholds = False
  # disk: each target's backbone features are stored once per (backbone,
  # image size, layers, data set) and every later evaluation of any head runs
  # the head only.
  c.eval.feature_cache = "none"     # none | disk
  c.eval.feature_cache_dtype = "float32"   # float32: cached results equal uncached ones
  c.eval.feature_cache_dir = ""     # default: <data.data_dir>/feature_cache
  # Scoring against neighbours (adjax.scoring_modes, SPEC section 11):
  # few_shot and batch need neither a trained head nor the text tower.
  c.eval.scoring = "zero_shot"      # zero_shot | few_shot | batch | zero_shot+few_shot | zero_shot+batch
  c.eval.references = 4             # few_shot: normal reference images per category (left out of the metrics)
  c.eval.references_dir = ""        # few_shot: folder with a subfolder per category of normal images (or a path with {category}, e.g. data/mvtec/{category}/train/good); the first eval.references (by path) are the bank and no test image is left out
  c.eval.coreset = 0.0              # few_shot: 0 keeps every reference patch; a fraction in (0, 1] or a count > 1 of them kept per layer and r, by greedy k-center (PatchCore's coreset, adjax.coreset)
  c.eval.coreset_seed = 0           # few_shot: the coreset's random start and projection
  c.eval.batch_subset = 0           # batch: 0 scores each image against all others of its category; S >= 5: against the others of its random subset of about S (memory and time bounded in the category's size)
  c.eval.r_list = (1, 3, 5)         # neighbour modes: LNAMD neighbourhood sizes (odd), maps averaged over them
  c.eval.rscin_k = (1, 2, 3)        # batch: RsCIN k_list refining image scores ((1, 8, 9) for VisA in MuSc)
  c.eval.combine = "zscore"         # zero_shot+...: each map normalised over its category (zscore | minmax), then averaged

  c.predict = ml_collections.ConfigDict()
  c.predict.input = ""              # folder or glob of images
  c.predict.object_name = ""        # required: the prompt's object name for these images
  c.predict.threshold = -1.0        # >= 0: the image threshold (else the mode's record's, if any)
  # folder or glob of normal images: set predict.scoring's thresholds from them
  # (few_shot: a reference among them is scored against the others)
  c.predict.calibrate_normals = ""
  c.predict.calibrate_quantile = 0.99   # their scores' quantile that becomes the threshold
  c.predict.batch_size = 8          # images per prediction batch
  # few_shot and batch need neither a trained head nor the text tower (adjax.Detector).
  c.predict.scoring = "zero_shot"   # zero_shot | few_shot (against predict.references) | batch (the inputs together)
  c.predict.references = ""         # few_shot: folder or glob of normal images of the object

  # Devices: a mesh ("data", "model"). The batch is split on "data"; the
  # trainable head is replicated; the frozen backbone's weights are either
  # replicated or split over "model" (for towers that do not fit one device).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1: all devices not used by "model"
  c.mesh.model = 1
  c.mesh.backbone_sharding = "replicated"   # replicated | model
  c.distributed = False             # call jax.distributed.initialize() (multi-host)
  # Left empty on TPU VMs and SLURM/GPU clusters, where JAX finds them itself.
  c.coordinator_address = ""        # host:port of process 0
  c.num_processes = 0               # with coordinator_address: number of processes
  c.process_id = -1                 # with coordinator_address: this process's index
  return c


VARIANTS = ("gpu", "gpu8", "tpu", "tpu_7b", "cpu", "dinov2", "exact")


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Variants shared by the experiment configs (`configs/x.py:tpu`).

  Several combine with "+", applied left to right: `configs/mvtec.py:dinov2+gpu8`.
  """
  if not arg:
    return c
  if "+" in arg:
    for part in arg.split("+"):
      apply_variant(c, part)
    return c
  if arg == "gpu":
    return c
  if arg == "dinov2":          # the paper protocol on DINOv2 ViT-L/14 with registers
    c.backbone.family = "dinov2"
    c.backbone.variant = "vitl14_reg"
    c.backbone.checkpoint = "checkpoints/dinov2_vitl14_reg"
    c.backbone.hub_id = "facebook/dinov2-with-registers-large"
    c.backbone.layers = (5, 11, 17, 23)
    c.image_size = 518         # 37 x 37 patches of 14 px: DINOv2's native grid
  elif arg == "exact":         # the release's numbers exactly: its quirks, float32 throughout
    c.reference_quirks = True
    c.backbone.dtype = "float32"
    c.feature_cache_dtype = "float32"
  elif arg == "gpu8":            # one host, 8 GPUs: data parallel, backbone replicated
    c.mesh.data, c.mesh.model = 8, 1
  elif arg == "tpu":           # multi-host TPU VM slice: every chip data parallel
    c.distributed = True
    c.mesh.data, c.mesh.model = -1, 1
  elif arg == "tpu_7b":        # the 7B backbone split over 4 chips per replica
    c.distributed = True
    c.backbone.variant = "vit7b16"
    c.backbone.checkpoint = "checkpoints/dinov3_vit7b16"
    c.backbone.hub_id = "facebook/dinov3-vit7b16-pretrain-lvd1689m"
    c.backbone.layers = (9, 19, 29, 39)
    c.mesh.data, c.mesh.model = -1, 4
    c.mesh.backbone_sharding = "model"
    c.text.variant = "vit-l-14"       # CLIP text architecture (clip_text.VARIANTS), for random_init
  elif arg == "cpu":           # a laptop: small backbone, small images
    c.backbone.variant = "vits16"
    c.backbone.checkpoint = "checkpoints/dinov3_vits16"
    c.backbone.hub_id = "facebook/dinov3-vits16-pretrain-lvd1689m"
    c.backbone.layers = (2, 5, 8, 11)
    c.backbone.dtype = "float32"
    c.image_size = 224
    c.batch_size = 8
    c.feature_cache = "disk"
  else:
    raise ValueError(f"unknown config variant {arg!r}; expected one of "
                     f"{', '.join(VARIANTS)} (several joined by +)")
  return c
