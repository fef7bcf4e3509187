"""Score the SmolLM2 seams the report left unscored (same tokens as pipeline.analyze --tokens 2048)."""
import json, sys, torch
torch.set_num_threads(1)
from pipeline.analysis import Candidate, prepare_tokens, score_candidates
from pipeline.analysis.recommend import default_data_files
model = sys.argv[1]; rep = json.load(open(sys.argv[2]))
tokens = prepare_tokens(model, data_files=default_data_files(), num_tokens=2048, seq_len=None, batch_size=4,
                        heldout_fraction=0.05, text_column="text")
rest = [Candidate(c["first_end"], c["second_start"], c["source_layers"], c["predicted_damage"], c["is_solar"], c["predicted_rank"])
        for c in rep["candidates"] if c["measured_perplexity"] is None]
for c in rest:
    score_candidates(model, [c], tokens.batches, device="cpu", progress=False)
    print(json.dumps({"slices": c.slices, "predicted_rank": c.predicted_rank, "measured_perplexity": c.measured_perplexity}), flush=True)
