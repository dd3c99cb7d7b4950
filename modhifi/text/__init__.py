"""Text encoders in the studio: a real pretrained sentence encoder (all-MiniLM-L6-v2) on real
English text (Debian's fortunes), pruned by ModHiFi-P on FFN neurons or whole attention heads.

Modules: `corpus` (the fortunes splits), `encoder` (loading, tokenizing, the layer layout),
`components` (statistics, fidelities, rankings and plans of the components), `latency` (the
cost model behind latency targets: one FFN and one attention block timed), `surgery`
(refit and physical removal; saving shapes), `quality` (dense-vs-modified metrics and the
category probe), `subject` (what the commands work on, and their reports), `forget` (ModHiFi-U:
forgetting a category), `commands` (the command line's text commands).
"""
