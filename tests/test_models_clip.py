"""CLIPTextEncoder vs transformers' CLIPTextModel: clip_skip 1 and 2, and the inputs_embeds path."""
import pytest
import torch

from fastdiff.models import CLIPTextEncoder
from fastdiff.random_model import randomize_

transformers = pytest.importorskip("transformers")

VOCAB = 1000
SD1 = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=77, vocab_size=VOCAB, hidden_act="quick_gelu",
           bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
# SD 2.x: OpenCLIP's tower stored as a CLIPTextModel: exact gelu, padding with token 0
SD2 = dict(SD1, hidden_size=80, num_attention_heads=5, intermediate_size=320, hidden_act="gelu", pad_token_id=0)


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    monkeypatch.setenv("FASTDIFF_OPS", "torch")


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_pair(cfg, seed=0):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    randomize_(ref, seed)
    ours = CLIPTextEncoder(ref.config.to_dict()).eval()
    # the on-disk spelling, text_model.*, plus the position_ids buffer old checkpoints carry
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ours.load_state_dict(sd, strict=True)
    return ref, ours


def prompt_ids(cfg, batch, length, n_tokens, seed):
    """bos, n_tokens random tokens, eos, then padding: what the tokenizer hands over."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), cfg["pad_token_id"], dtype=torch.long)
    ids[:, 0] = cfg["bos_token_id"]
    ids[:, 1:n_tokens + 1] = torch.randint(1, VOCAB - 2, (batch, n_tokens), generator=g)
    ids[:, n_tokens + 1] = cfg["eos_token_id"]
    return ids


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1-quick_gelu", "sd2-gelu"])
@pytest.mark.parametrize("length", [77, 12])
def test_clip_matches_transformers(cfg, length):
    ref, ours = make_pair(cfg)
    ids = prompt_ids(cfg, 2, length, 7, seed=1)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        assert rel_err(ours(ids), out.last_hidden_state) <= 1e-4
        assert rel_err(ours(input_ids=ids, clip_skip=1), out.last_hidden_state) <= 1e-4
        skip2 = ref.final_layer_norm(out.hidden_states[-2])
        assert rel_err(ours(ids, clip_skip=2), skip2) <= 1e-4
        skip3 = ref.final_layer_norm(out.hidden_states[-3])
        assert rel_err(ours(ids, clip_skip=3), skip3) <= 1e-4
        assert rel_err(skip2, out.last_hidden_state) > 1e-2  # clip_skip does change the output


@pytest.mark.parametrize("cfg", [SD1, SD2], ids=["sd1", "sd2"])
def test_clip_inputs_embeds_splices_vectors(cfg):
    """Textual inversion: vectors spliced into token_embedding(ids) act like extra vocabulary."""
    ref, ours = make_pair(cfg, seed=2)
    ids = prompt_ids(cfg, 2, 20, 9, seed=3)
    vectors = torch.randn(2, cfg["hidden_size"], generator=torch.Generator().manual_seed(4)) * 0.2
    with torch.no_grad():
        embeds = ours.token_embedding(ids)
        embeds[:, 3:5] = vectors
        out = ours(inputs_embeds=embeds, clip_skip=2)
        # reference: the same vectors as two otherwise unused rows of transformers' vocabulary
        new_ids = torch.tensor([VOCAB - 4, VOCAB - 3])
        ref.embeddings.token_embedding.weight[new_ids] = vectors
        ids2 = ids.clone()
        ids2[:, 3:5] = new_ids
        expect = ref.final_layer_norm(ref(ids2, output_hidden_states=True).hidden_states[-2])
        plain = ours(ids, clip_skip=2)
    assert rel_err(out, expect) <= 1e-4
    assert rel_err(plain, expect) > 1e-2


def test_clip_accepts_transformers5_keys():
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD1))
    ours = CLIPTextEncoder(SD1)
    ours.load_state_dict(ref.state_dict(), strict=True)  # with or without the text_model. prefix
    assert "text_model.embeddings.token_embedding.weight" in ours.state_dict()
    assert all(k.startswith("text_model.") for k in ours.state_dict())


def test_clip_argument_errors():
    ours = CLIPTextEncoder(SD1)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError):
        ours()
    with pytest.raises(ValueError):
        ours(ids, inputs_embeds=ours.token_embedding(ids))
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=4)
    with pytest.raises(ValueError, match="clip_skip"):
        ours(ids, clip_skip=0)
    with pytest.raises(NotImplementedError):
        CLIPTextEncoder(dict(SD1, hidden_act="relu"))


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu", pad_token_id=1, projection_dim=512)


@pytest.mark.parametrize("cfg", [CLIP_L, OPENCLIP_H], ids=["sd1-clip-l", "sd2-openclip-h"])
def test_clip_real_config_has_checkpoint_keys_and_shapes(cfg):
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
        ours = CLIPTextEncoder(cfg)
    expect = {"text_model." + k.removeprefix("text_model."): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expect
