#!/usr/bin/env python3
"""Train a small random-init Llama with Hugging Face Trainer and flora_ext.Flora.

Flora's settings come from TrainingArguments: ``learning_rate``, ``weight_decay`` and
``optim_args`` ("rank=8,kappa=100,beta1=0.9"). With ``--accumulation-rank`` the gradient
accumulation runs through FloraAccumulator (compressed to that rank, stepped in the backward
hooks), in step with Trainer's ``gradient_accumulation_steps``; that mode needs
``max_grad_norm=0`` (see flora_ext/integrations/hf.py). The data are random token sequences
built in place, so the script needs no download; it checks the wiring, not a model's quality.
Needs transformers and accelerate (requirements-test.txt).

    python examples/python/train_hf_trainer.py --accumulation-rank 4
"""
import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from flora_ext.integrations.hf import add_flora_accumulation, flora_optimizer_cls_and_kwargs


class RandomTokens(torch.utils.data.Dataset):
    """Sequences that repeat a random pattern of 8 tokens: learnable, so the loss drops."""

    def __init__(self, count, length, vocab, seed=0):
        gen = torch.Generator().manual_seed(seed)
        patterns = torch.randint(0, vocab, (count, 8), generator=gen)
        self.tokens = patterns.repeat(1, -(-length // 8))[:, :length]

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--accumulation-rank", type=int, default=None,
                        help="compressed accumulation through FloraAccumulator at this rank "
                             "(default: Trainer's own accumulation)")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--optim-args", default="rank=8,kappa=100,beta1=0.9")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="flora_hf_")
    training_args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation_steps, num_train_epochs=args.epochs,
        learning_rate=args.lr, weight_decay=0.0, optim_args=args.optim_args,
        lr_scheduler_type="cosine", warmup_steps=2,
        # FloraAccumulator steps inside backward: Trainer's clipping could not act (refused).
        max_grad_norm=0.0 if args.accumulation_rank is not None else 1.0,
        logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=training_args,
                      train_dataset=RandomTokens(args.samples, 32, config.vocab_size),
                      optimizer_cls_and_kwargs=flora_optimizer_cls_and_kwargs(training_args))
    if args.accumulation_rank is not None:
        add_flora_accumulation(trainer, rank=args.accumulation_rank)
    start = time.perf_counter()
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{trainer.state.global_step} optimizer steps in {time.perf_counter() - start:.1f} s "
          f"({'FloraAccumulator rank ' + str(args.accumulation_rank) if args.accumulation_rank else 'Trainer accumulation'}); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, mean {result.training_loss:.3f}")


if __name__ == "__main__":
    main()
