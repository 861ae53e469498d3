"""Shared test fixtures: where ../shared lives, and small random models."""
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MARVAL_SHARED", ROOT.parent / "shared"))
REFERENCE_PT = SHARED / "testdata" / "mar_reference_small.pt"

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_file(*parts):
    """Path to a file under ../shared, or skip the test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists() and os.environ.get("MARVAL_REQUIRE_SHARED") == "1":
        pytest.fail(f"{path} not found and MARVAL_REQUIRE_SHARED=1 (CI): parity checks must not be skipped")
    if not path.exists():
        pytest.skip(f"{path} not found: the parity data lives in ../shared beside the repository "
                    "(set MARVAL_SHARED to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def reference():
    """The official-code parity vectors (random weights), loaded once."""
    return torch.load(shared_file("testdata", "mar_reference_small.pt"), weights_only=True)


def randomize_(model, std=0.05, seed=0):
    """Add noise to every parameter, so zero-initialised layers (adaLN, the final layer) carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="session")
def toy_vae_file(tmp_path_factory):
    """A briefly trained toy VAE (30 steps, ~2 s) saved like runs/toy_vae.pt: pass it as --toy-vae."""
    import common
    import data
    import vae
    path = tmp_path_factory.mktemp("toy_vae") / "toy_vae.pt"
    model = vae.train_toy_vae(data.toy_digits("train")[0], data.toy_digits("heldout")[0], steps=30, verbose=False)
    common.save_checkpoint(str(path), {"model": model.state_dict()})
    return str(path)


@pytest.fixture(scope="session")
def toy_classifier_file(tmp_path_factory):
    """The toy classifier, trained once per session by the real code (1,500 steps, ~20-40 s) and then shared: the
    stages and ToyEvaluator only read a --classifier file that exists, and train one only where it is missing."""
    import evaluate
    path = tmp_path_factory.mktemp("toy_classifier") / "toy_classifier.pt"
    evaluate.load_toy_classifier(str(path))
    return str(path)


@pytest.fixture(scope="session")
def toy_ckpt(tmp_path_factory, toy_vae_file):
    """A toy-configuration MAR with small random (non-zero) weights, saved in the official checkpoint format, with
    the toy VAE its latents belong to (as train_mar.py --preset toy writes it)."""
    import data
    import common
    import mar
    torch.manual_seed(0)
    m = randomize_(mar.MAR(**data.TOY_MODEL), std=0.02)
    path = tmp_path_factory.mktemp("toy_ckpt") / "checkpoint-last.pth"
    common.save_checkpoint(str(path), {"model": m.state_dict(), "model_ema": m.state_dict(),
                                       "toy_vae": mar.read_checkpoint(toy_vae_file)["model"]})
    return str(path)


@pytest.fixture(scope="session")
def toy_student_ckpt(tmp_path_factory, toy_ckpt):
    """toy_ckpt's weights saved as a MARVAL one-step student (what distill_gsim.py writes: "kind": "student"), for the
    tools that refuse a teacher where a student belongs (rl_refine.py --student, sample.py --one-step)."""
    import common
    import mar
    path = tmp_path_factory.mktemp("toy_student") / "checkpoint-last.pth"
    common.save_checkpoint(str(path), {**mar.read_checkpoint(toy_ckpt), "kind": "student"})
    return str(path)


@pytest.fixture(scope="session")
def pickscore_dirs(tmp_path_factory):
    """A tiny random transformers CLIP + processor (byte-level vocabulary, no merges) saved like the real ones."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    d = tmp_path_factory.mktemp("pickscore")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(crop_size={"height": 32, "width": 32},
                                                            size={"shortest_edge": 32}),
                         tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    proc.save_pretrained(d / "processor")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    CLIPModel(cfg).save_pretrained(d / "model")
    return str(d / "model"), str(d / "processor")
