"""Data: synthetic dataset, decoding, Kaldi fbank, tokenisation, datasets and loaders."""
from .dataset import VideoAudioTextDataset, collate  # noqa: F401
from .fbank import kaldi_fbank  # noqa: F401
from .loader import Loader, build_loader  # noqa: F401
from .synth import generate, prepare_data  # noqa: F401
from .tokenizer import get_tokenizer  # noqa: F401
