"""The Flower engine (flwr==1.41.0, Message API): the only package that imports `flwr`.

- `wire`: payloads as one uint8 Flower array, byte counting of every message, the config in the run config
- `client_app`: the ClientApp; each SuperNode runs `run_client` with its own data and client-state store
- `engine`: `FlowerEngine` (jobs -> messages -> replies over a Grid) and the Flower federation
- `secagg_plus`: a round under Flower's SecAgg+ protocol
The ServerApp, which runs fedtune's loop, and the simulation entry point are in
`fedtune.recipes.flower` (the loop is above the engines).
"""

FLWR_VERSION = "1.41.0"
