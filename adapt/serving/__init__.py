"""`adapt serve`: a diffusion checkpoint behind the OpenAI HTTP API (completions, chat, streaming).

- `api`: the request bodies accepted, checked into token ids and a `SamplingConfig` (nothing allocated);
- `batcher`: one model lent to batches of compatible requests in turn, step by step;
- `stream`: what of a row's text is settled and may be sent;
- `app`: the FastAPI routes, the API key, the body limit, server-sent events;
- `command`: the `adapt serve` command (binds, loads, runs uvicorn).

FastAPI and uvicorn are the `serve` extra (`pip install 'adapt[serve]'`), imported only here.
"""
