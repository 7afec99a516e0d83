# Moneta at the paper's 340M size on FineWeb-Edu (Behrouz et al. 2025, Table 5: 24 layers x 1024, 16 heads,
# peak lr 1.5e-3, 15B tokens, context 4096), for a GPU node:
#
#   python data/prepare_text.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_name=sample-100BT \
#       --hf_split=train --max_tokens=15200000000 --val_fraction=0.005 --out=data/fineweb_edu   # once, online
#   torchrun --standalone --nproc_per_node=8 train.py config/train_moneta_340m.py
#
# Batch: 8 sequences x 4096 tokens x 16 micro-batches = 524,288 tokens (0.5M) per step, 28,610 steps = 15B
# tokens. gradient_accumulation_steps counts micro-batches over all processes: with 8 GPUs each runs 2 per
# step; the number of GPUs must divide it (1, 2, 4, 8 or 16; train.py says so otherwise). If memory runs
# short, halve batch_size and double gradient_accumulation_steps (same global batch).
# The paper does not state warmup, decay floor, weight decay or betas: these are the usual choices of the
# baselines it compares with (GLA / Gated DeltaNet recipes): ~1B tokens of warmup, cosine to lr / 10,
# weight decay 0.1, betas (0.9, 0.95), gradient clipping at 1.0.
config = {
    "model": "moneta",
    "preset": "340m",
    "dataset": "fineweb_edu",
    "out_dir": "out-moneta-340m",
    "block_size": 4096,
    "batch_size": 8,
    "gradient_accumulation_steps": 16,
    "max_iters": 28610,
    "learning_rate": None,      # the preset's: 1.5e-3
    "min_lr": None,             # learning_rate / 10
    "warmup_iters": 2000,
    "lr_decay_iters": None,     # = max_iters
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "grad_clip": 1.0,
    "eval_interval": 1000,
    "eval_iters": 50,
    "log_interval": 10,
    "device": "auto",           # cuda:LOCAL_RANK under torchrun
    "dtype": "bfloat16",
    "compile": True,
}
