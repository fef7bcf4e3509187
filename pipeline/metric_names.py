"""Names of the metrics stages record in their manifests: one contract between the code that
writes them (the training runner, the eval stage) and the code that reads them (the model card,
sweep summaries, plots). Keys are flat strings; eval metrics are ``<task>/<metric>``."""

# Training stages (pipeline.training.runner), besides the Trainer's own (train_runtime, epoch, ...).
TRAIN_LOSS = "train_loss"
TRAIN_RUNTIME = "train_runtime"
EPOCH = "epoch"
GLOBAL_STEP = "global_step"
WORLD_SIZE = "world_size"
NUM_PARAMETERS = "num_parameters"
TRAINABLE_PARAMETERS = "trainable_parameters"
TOKENS_SEEN = "tokens_seen"
PRECISION = "precision"
ATTN_IMPLEMENTATION = "attn_implementation"
ZERO_STAGE = "zero_stage"
RESUMED_FROM = "resumed_from"
RESUME = "resume"
VERIFICATION = "verification"  # {trained_fixed_batch_loss, reloaded_fixed_batch_loss, abs_diff, rtol}

# The eval stage (pipeline.stages.eval), per evaluated stage.
HELDOUT = "heldout"  # held-out corpus records, per-token perplexity
SFT_HELDOUT = "sft_heldout"  # held-out conversations, assistant tokens only
HELDOUT_PERPLEXITY = f"{HELDOUT}/perplexity"
HELDOUT_LOSS = f"{HELDOUT}/loss"
SFT_HELDOUT_LOSS = f"{SFT_HELDOUT}/loss"
HARNESS_AVERAGE = "harness/average"
