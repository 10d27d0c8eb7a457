"""The image normalisation every BLIP model uses: OpenAI CLIP's per-channel mean and std.

Its own module, free of torch and transformers, so light CPU code (capfilt's decode tasks) can
import it without loading the model stack.
"""

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
