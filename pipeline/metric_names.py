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
# Counted on the micro-batches the training loop consumed, summed over ranks (training.callbacks.ConsumedTokens):
TOKENS_SEEN = "tokens_seen"  # input tokens that are not padding
TRAINED_TOKENS = "trained_tokens"  # tokens that carry the loss (labels != -100; DPO: both replies of each pair)
TOKENS_COUNTED_FROM_STEP = "tokens_counted_from_step"  # > 0: a resumed run whose checkpoint kept no counts
PRECISION = "precision"
ATTN_IMPLEMENTATION = "attn_implementation"
ZERO_STAGE = "zero_stage"
RESUMED_FROM = "resumed_from"
RESUME = "resume"
VERIFICATION = "verification"  # {trained_fixed_batch_loss, reloaded_fixed_batch_loss, abs_diff, rtol}
HELDOUT_CURVE = "heldout_curve"  # cpt.eval_every_tokens: [{step, tokens_seen, heldout_loss}], the Trainer's eval on the held-out blocks

# The eval stage (pipeline.stages.eval), per evaluated stage.
HELDOUT = "heldout"  # held-out corpus records, per-token perplexity
SFT_HELDOUT = "sft_heldout"  # held-out conversations, assistant tokens only
HELDOUT_PERPLEXITY = f"{HELDOUT}/perplexity"
HELDOUT_LOSS = f"{HELDOUT}/loss"
SFT_HELDOUT_LOSS = f"{SFT_HELDOUT}/loss"
HARNESS_AVERAGE = "harness/average"
