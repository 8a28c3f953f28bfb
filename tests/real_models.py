"""A corpus of real architectures for the flow-by-flow tests, built without downloads.

Hugging Face models come from tiny random configs (the code is the library's, the weights are
random); the small models below reproduce patterns real model code has and qviz once got
wrong: in-place activations, functional heads, chunk/getitem, a reused ReLU, a model the user
fused already, layer-scale parameters, token ids into an embedding. Each builder returns
``(model, calib_batches, eval_batches)`` with the batch form the model's users hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao import quantization as tq

VOCAB = 99


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _token_batches(n: int, seed: int, *, batch=2, seq=12, mask=True) -> list[dict]:
    g = _gen(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        item = {"input_ids": ids}
        if mask:
            m = torch.ones(batch, seq, dtype=torch.long)
            m[0, -3:] = 0  # a padded sequence, as real batches have
            item["attention_mask"] = m
        out.append(item)
    return out


def _images(n: int, seed: int, shape=(2, 3, 16, 16)) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# -- Hugging Face transformers (tiny random configs) -------------------------------------------
def bert():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=37, num_labels=3)
    return tf.BertForSequenceClassification(config).eval(), _token_batches(2, 1), _token_batches(1, 2)


def gpt2():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)
    return tf.GPT2LMHeadModel(config).eval(), _token_batches(2, 1, mask=False), _token_batches(1, 2, mask=False)


def llama():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).eval(), _token_batches(2, 1), _token_batches(1, 2)


def vit():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=37, num_labels=5)
    model = tf.ViTForImageClassification(config).eval()
    return model, [{"pixel_values": x} for x in _images(2, 1)], [{"pixel_values": x} for x in _images(1, 2)]


# -- recurrent language models ------------------------------------------------------------------
class RecurrentLM(nn.Module):
    """Embedding -> LSTM/GRU -> Linear over the vocabulary: token ids in, logits out."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 24)
        self.rnn = cell(24, 32, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


def _recurrent(cell):
    torch.manual_seed(0)
    ids = [b["input_ids"] for b in _token_batches(3, 1, mask=False)]
    return RecurrentLM(cell).eval(), ids[:2], ids[2:]


def lstm_lm():
    return _recurrent(nn.LSTM)


def gru_lm():
    return _recurrent(nn.GRU)


# -- patterns of real CNN code --------------------------------------------------------------------
class InplaceCNN(nn.Module):
    """timm/torchvision style: every activation in place."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.Hardswish(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class FunctionalHead(nn.Module):
    """A classifier written with F.linear on the module's own parameters (timm's Linear)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(5, 8) * 0.3)
        self.bias = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        return F.linear(torch.relu(self.conv(x)).mean((2, 3)), self.weight, self.bias)


class ChunkNet(nn.Module):
    """chunk -> getitem nodes, as ViT/ShuffleNet code has."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, 1)
        return self.fc((self.conv2(a) + b).mean((2, 3)))


class ReusedReLU(nn.Module):
    """A residual block that calls one nn.ReLU twice."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) + y)
        return self.fc(y.mean((2, 3)))


class LayerScaleBlock(nn.Module):
    """ConvNeXt style: depthwise conv, pointwise MLP, a learned per-channel layer scale."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.pw1 = nn.Linear(8, 16)
        self.pw2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(y))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


class TutorialNet(nn.Module):
    """The PyTorch tutorial way: stubs in the model, and a fuse_model() the user calls first."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(8 * 16 * 16, 5)

    def forward(self, x):
        x = self.quant(x)
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.dequant(self.fc(x.flatten(1)))

    def fuse_model(self):
        tq.fuse_modules(self, [["conv1", "bn1", "relu1"], ["conv2", "relu2"]], inplace=True)


def _cnn(cls, *, wrap=False):
    def build():
        torch.manual_seed(0)
        model = cls().eval()
        return (tq.QuantWrapper(model).eval() if wrap else model), _images(2, 1), _images(1, 2)
    build.__name__ = cls.__name__
    return build


def user_fused():
    torch.manual_seed(0)
    model = TutorialNet().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding them matters
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    model.fuse_model()
    return model, _images(2, 1), _images(1, 2)


BUILDERS = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit,
    "lstm_lm": lstm_lm, "gru_lm": gru_lm,
    "inplace_cnn": _cnn(InplaceCNN), "functional_head": _cnn(FunctionalHead), "chunk": _cnn(ChunkNet),
    "reused_relu": _cnn(ReusedReLU), "layer_scale": _cnn(LayerScaleBlock), "user_fused": user_fused,
    # eager mode needs stubs: the same patterns wrapped in QuantWrapper, as its users do
    "inplace_cnn_wrapped": _cnn(InplaceCNN, wrap=True), "chunk_wrapped": _cnn(ChunkNet, wrap=True),
    "functional_head_wrapped": _cnn(FunctionalHead, wrap=True),
}
