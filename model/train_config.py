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
    weight_decay: float = 0.05  # AdamW decay on matrices (not on biases, norms, temperature)
    alpha_rampup_epochs: int = 1  # distillation alpha ramps up linearly over these epochs (BLIP: 1)
    itc: bool = True  # image-text contrastive loss
    itm: bool = True  # image-text matching loss (hard negatives from ITC similarities)
    lm: bool = True  # captioning (language modelling) loss
    lm_prompt: str = ""  # text put before every caption and not predicted (captioner: "a picture of ")
    crop_scale_min: float = 0.5  # random resized crop keeps 50-100% of the area (BLIP: 0.5)
    hflip: bool = False  # random horizontal flip; off because captions name left and right
    randaug_ops: int = 2  # RandAugment ops per image (BLIP: 2); 0 turns augmentation off
    randaug_magnitude: int = 5  # RandAugment level out of 10 (BLIP: 5)
    max_words: int = 30  # captions are cut to this many words (BLIP pre-training: 30)
    max_text_len: int = 35  # token limit, [CLS] and [SEP] included (BLIP: 35)
    num_workers: int = 0  # DataLoader worker processes per rank (0: decode in the training process)
    seed: int = 0  # seeds the data order, augmentation, text sampling and the model's own RNG
    log_every: int = 50  # optimiser steps between progress lines / TensorBoard scalars
    ckpt_every: int = 1000  # optimiser steps between checkpoints (one is always written at the end)
    keep_ckpts: int = 2  # checkpoints kept on disk, newest first
    bf16: bool = True  # bfloat16 autocast where it is native (CUDA, CPUs with AVX512-BF16 or AMX), else fp32
