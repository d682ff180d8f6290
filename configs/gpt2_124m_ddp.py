"""
GPT-2 124M on the GPUs of one node with DDP: the run of gpt2_124m.py, only faster. This file holds what
differs (where it is written); gpt2_124m.py, given first, holds the run.

  python prepare.py --num_train_shards=100
  torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py configs/gpt2_124m_ddp.py

The batch stays 2**19 = 524,288 tokens per step whatever the number of GPUs N, and train.py derives the grad
accumulation from it: accum = 524,288 / (32 sequences x 1,024 tokens x N GPUs)
  N = 8: 32 x 1,024 x 8 = 262,144 tokens per micro-step, accum 2
  N = 4: accum 4;  N = 2: accum 8;  N = 1: accum 16;  N = 16 (two nodes): accum 1
N must divide 16; for N = 3, 5, 6 or 7 pick a total_batch_size that 32 x 1,024 x N divides (N = 6: 589,824).
Every rank reads its own slice of the data and evaluates its share of the val set; the losses are averaged
over all ranks, so the numbers equal those of the one-GPU run.
"""
out_dir = 'out-gpt2-124m-ddp'
# 19,073 steps x 524,288 tokens = 10.0B tokens: under an hour on 8 H100s at ~490K tokens/s each
