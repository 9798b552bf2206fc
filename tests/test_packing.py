"""Padding-free packing: samples packed into one row must not attend to each other."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from medgpt.encoding import pack_documents


def test_packed_samples_do_not_attend_to_each_other(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False  # the block-diagonal mask is built from position_ids only without a cache
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(10, 1000, (n,), generator=generator).tolist() for n in (7, 11, 5)]
    rows = [{"input_ids": s, "labels": s} for s in samples]
    args = SFTConfig(
        output_dir=str(tmp_path), packing=True, max_length=64, per_device_train_batch_size=1, use_cpu=True,
        bf16=False, report_to="none", shuffle_dataset=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == (1, sum(map(len, samples)))  # one row, no padding
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for begin, end in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, begin:end]).logits[0]
            torch.testing.assert_close(packed_logits[begin:end], alone, atol=1e-4, rtol=1e-4)
        # The check can fail: without position_ids every later sample sees the ones before it.
        leaky = model(input_ids=batch["input_ids"]).logits[0]
        assert not torch.allclose(leaky[starts[1]:starts[2]], packed_logits[starts[1]:starts[2]], atol=1e-3)
    # Labels never ask a sample's first token to be predicted from the previous sample.
    assert (batch["labels"][0][torch.tensor(starts[:-1])] == -100).all()


def test_pack_documents_puts_separator_after_each_document_and_keeps_the_tail():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6]], block_size=4, separator_id=0)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [0]]
