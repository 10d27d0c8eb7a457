"""`TrainConfig`: every knob of `model.train.train`, in a module without torch.

It lives apart from the trainer so `capfilt.config` (which embeds it as the `train` section)
loads without importing torch; `model.train` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # passes over the data (BLIP pre-trains 20 epochs)
    max_steps: int = 0  # optimiser steps to run; 0 = epochs * steps per epoch
    batch_size: int = 32  # images per process per micro-batch (BLIP: 75 x 8 GPUs for base)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-4  # peak learning rate (BLIP pre-training 3e-4; fine-tuning 1e-5..2e-5)
    min_lr: float = 1e-6  # floor the cosine decays to
    warmup_steps: int = 3000  # linear warm-up steps (BLIP: 3000), capped at a tenth of the run
    # AdamW decay on every trainable parameter, biases, norms and the temperature included, as
    # BLIP's AdamW(model.parameters(), weight_decay=0.05) in pre-training and both fine-tunings
    weight_decay: float = 0.05
    # distillation alpha ramps up linearly over these epochs: BLIP pretrain.py 2; its
    # fine-tuning (train_retrieval.py) 1, the captioner and filter roles' default
    alpha_rampup_epochs: int = 2
    itc: bool = True  # image-text contrastive loss
    itm: bool = True  # image-text matching loss (hard negatives from ITC similarities)
    lm: bool = True  # captioning (language modelling) loss
    # text put before every caption and not predicted; capfilt sets it from run.caption.prompt
    # for the captioner role and to "" otherwise (capfilt/training.py role_config)
    lm_prompt: str = ""
    # random resized crop keeps this share of the area up to all of it: BLIP pretrain.py 0.2;
    # its fine-tunings 0.5 (create_dataset's default), the captioner and filter roles' default
    crop_scale_min: float = 0.2
    # random horizontal flip: BLIP flips half of the images; off here because captions that
    # name left and right become false under a mirror image
    hflip: bool = False
    randaug_ops: int = 2  # RandAugment ops per image, drawn with replacement (BLIP: 2); 0 = off
    randaug_magnitude: int = 5  # RandAugment level out of 10 (BLIP: 5; it makes brightness/sharpness no-ops)
    max_words: int = 30  # captions are cut to this many words (BLIP: 30)
    # column naming each row's image (e.g. COCO's image_id): rows with equal values are one
    # image, ITC positives of each other and never each other's ITM negatives (BLIP's
    # coco_karpathy img_id); "" = the sha256 of the image bytes (so too for null values)
    image_id_column: str = ""
    # token limit, [CLS] and [SEP] (and the prompt) included: BLIP pre-training 30; the
    # filter's fine-tuning 35 (blip_retrieval.py) and the captioner's 40 (blip.py) as role defaults
    max_text_len: int = 30
    num_workers: int = 0  # DataLoader worker processes per rank (0: decode in the training process)
    seed: int = 0  # seeds the data order, augmentation, text sampling and the model's own RNG
    log_every: int = 50  # optimiser steps between progress lines / TensorBoard scalars
    ckpt_every: int = 1000  # optimiser steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 2  # checkpoints kept on disk, newest first
    bf16: bool = True  # bfloat16 autocast where it is native (CUDA, CPUs with AVX512-BF16 or AMX), else fp32
