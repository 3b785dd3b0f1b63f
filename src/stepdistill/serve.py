"""`stepdistill serve`: a trained student behind a small HTTP endpoint (FastAPI + uvicorn).

    stepdistill serve --model exported/svamp-student --port 8000
    curl -s localhost:8000/predict -H 'content-type: application/json' \\
         -d '{"inputs": ["Tom has 3 apples and buys 4 more. How many?"], "rationale": true}'
    {"predictions": [{"label": "(3 + 4)", "rationale": "3 plus 4 is 7."}], "model": "...", "ms": 41.2}

POST /predict takes `input` (one string) or `inputs` (a list of at most 256); `rationale: true`
also runs the rationale task. A malformed body, an unknown field, an input over 100,000
characters or too many inputs is answered 422 with the reason; the server goes on serving.
GET /health says which model is loaded. Needs the `serve` extra: pip install "stepdistill[serve]".
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from stepdistill.errors import StepDistillError

MAX_INPUTS = 256  # per request: a bigger batch is the batch command's job (stepdistill predict)
# characters per input: far beyond any model's context (inputs are cut to max_input_length tokens
# anyway), small enough that a hostile request cannot make the tokenizer chew megabytes
MAX_INPUT_CHARS = 100_000
Text = Annotated[str, StringConstraints(max_length=MAX_INPUT_CHARS)]


class Query(BaseModel):
    """The body of POST /predict."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    input: Text | None = None
    inputs: list[Text] | None = Field(None, max_length=MAX_INPUTS)
    rationale: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "Query":
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give either `input` (a string) or `inputs` (a list of strings)")
        return self


def create_app(model: str | Path, *, max_new_tokens: int | None = None, batch_size: int = 32, dtype: str = "float32",
               label_decoding: str = "generate"):
    """The FastAPI app serving one trained student (loaded once, here)."""
    try:
        from fastapi import FastAPI, HTTPException
    except ImportError as e:
        raise StepDistillError('stepdistill serve needs FastAPI: pip install "stepdistill[serve]"') from e

    from stepdistill.evaluation import decoding_vocab, explain, label_token_limit, load_trained, predict

    student, info = load_trained(model, dtype=dtype)
    limit = max_new_tokens or label_token_limit(info)
    vocab = decoding_vocab(info, label_decoding, model)
    lock = threading.Lock()  # one forward at a time: torch already uses every core for one batch

    app = FastAPI(title="stepdistill student", description=f"{info.get('method')} student from {model}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": str(model), "method": info.get("method")}

    @app.post("/predict")
    def predict_route(q: Query) -> dict[str, Any]:
        texts = [q.input] if q.input is not None else list(q.inputs or [])
        if not texts:
            raise HTTPException(status_code=422, detail="`inputs` is empty: send at least one input")
        t0 = time.perf_counter()
        with lock:
            labels = predict(student, texts, prefix=info["label_prefix"], batch_size=batch_size, max_new_tokens=limit,
                             vocab=vocab)
            why = explain(student, info, texts, limit=limit, batch_size=batch_size) if q.rationale else None
        preds = [{"label": label, **({"rationale": why[i]} if why is not None else {})} for i, label in enumerate(labels)]
        return {"predictions": preds, "model": str(model), "ms": round(1000 * (time.perf_counter() - t0), 1)}

    return app


def serve(model: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_new_tokens: int | None = None,
          dtype: str = "auto", label_decoding: str = "generate") -> None:
    try:
        import uvicorn
    except ImportError as e:
        raise StepDistillError('stepdistill serve needs uvicorn: pip install "stepdistill[serve]"') from e
    app = create_app(model, max_new_tokens=max_new_tokens, dtype=dtype, label_decoding=label_decoding)
    uvicorn.run(app, host=host, port=port, log_level="info")
