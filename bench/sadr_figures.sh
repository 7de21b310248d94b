#!/usr/bin/env bash
# Figures 6 and 7 analogues of the SADR paper on SmolLM2: the grid points they need, then the figures.
# Every point is a resumable run of bench/sadr_grid.py over the first N validation cases (default 30) of
# merged CounterFact; points shared with the validation scan reuse its per-case records.
#   bash bench/sadr_figures.sh [N]      (THREADS=1 to share the machine) -> docs/figures/sadr_fig{6,7}.png, bench/results/sadr_figures.json
set -euo pipefail
N=${1:-30}
grid() { python bench/sadr_grid.py --method rome --cases "$N" --threads "${THREADS:-2}" "$@"; }
# figure 6: selective vs all heads over gamma (SADR on layers 20-29, ROME's 20 steps); gamma 0 = plain ROME
grid --steps 20 --gamma 0
grid --steps 20 --gamma 0.1,0.3,1 --heads selective,all --layers 20-29
# figure 7: ROME's own steps, learning rate and KL factor (SADR off) against SADR's gamma
grid --steps 10,40,80 --gamma 0
grid --steps 20 --gamma 0 --lr 0.1,0.25,1
grid --steps 20 --gamma 0 --kl-factor 0.25,1
python bench/sadr_figures.py --steps 20 --cases "$N" --layers 20-29
