"""Packing for cpt: block layout, labels at document starts, and no attention across documents."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from pipeline.data import pack_documents


def test_blocks_cut_the_stream_and_drop_the_tail():
    docs = [[1, 10, 11, 2], [1, 20, 21, 22, 2], [1, 30, 2]]  # 12 tokens
    packed = pack_documents(docs, seq_len=5)
    assert packed.input_ids == [[1, 10, 11, 2, 1], [20, 21, 22, 2, 1]]
    assert packed.tokens_total == 12 and packed.tokens_dropped == 2
    stats = packed.stats(pad_token_id=0)
    assert stats["packing_efficiency"] == 1.0 and stats["blocks"] == 2
    assert stats["tokens_used_fraction"] == pytest.approx(10 / 12)


def test_positions_restart_per_document_and_no_label_crosses_a_boundary():
    docs = [[1, 10, 11, 2], [1, 20, 21, 22, 2]]
    packed = pack_documents(docs, seq_len=9)
    assert packed.position_ids == [[0, 1, 2, 3, 0, 1, 2, 3, 4]]
    # The first token of the second document is not trained to follow the first document.
    assert packed.labels == [[1, 10, 11, 2, -100, 20, 21, 22, 2]]


def test_a_document_split_across_blocks_restarts_positions():
    packed = pack_documents([[1, 5, 6, 7, 8, 9, 2]], seq_len=4)
    assert packed.position_ids == [[0, 1, 2, 3]]
    packed = pack_documents([[1, 5, 6, 7, 8, 9, 2], [1, 4]], seq_len=4)
    assert packed.position_ids[1] == [0, 1, 2, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(attn):
    """The proof that packing leaks no attention: logits of a packed batch equal those of every
    document run on its own. In training mode, as the Trainer runs it, with the model loaded the
    way the cpt stage loads it (use_cache off: see pipeline.training.model.load_model_for_training)."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           sliding_window=None)
    config._attn_implementation = attn
    model = MistralForCausalLM(config).train()  # dropout is 0 in Mistral: train mode is deterministic
    model.config.use_cache = False
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (7, 5, 9, 3, 8)]
    packed = pack_documents(docs, seq_len=16)  # 32 tokens -> 2 blocks, doc 3 spans both
    with torch.no_grad():
        out = model(input_ids=torch.tensor(packed.input_ids), position_ids=torch.tensor(packed.position_ids)).logits
        flat = out.reshape(-1, out.shape[-1])
        pos = 0
        for doc in docs:
            # The same document may be cut by a block boundary: each piece is its own sequence.
            while doc:
                room = 16 - pos % 16
                piece, doc = doc[:room], doc[room:]
                alone = model(input_ids=torch.tensor([piece])).logits[0]
                torch.testing.assert_close(flat[pos:pos + len(piece)], alone, atol=1e-5, rtol=1e-5)
                pos += len(piece)
    # And the check can fail: with a KV cache (use_cache=True, the config default) transformers
    # ignores the packed position_ids and the second document attends to the first.
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor(packed.input_ids), position_ids=torch.tensor(packed.position_ids),
                      use_cache=True).logits[0, 7:12]
        alone = model(input_ids=torch.tensor([docs[1]])).logits[0]
    assert not torch.allclose(leaky, alone, atol=1e-3)
