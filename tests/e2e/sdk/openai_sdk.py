"""The official OpenAI Python SDK against a Kith node, unmodified.

Env: KITH_BASE_URL (http://127.0.0.1:PORT/v1), KITH_TOKEN. Prints one JSON object.
"""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["KITH_BASE_URL"], api_key=os.environ["KITH_TOKEN"], max_retries=0)
models = [m.id for m in client.models.list()]
answer = client.chat.completions.create(
    model="smollm2-135m",
    messages=[{"role": "user", "content": "Say hello."}],
    temperature=0,
    max_tokens=12,
)
streamed = ""
finish = None
for chunk in client.chat.completions.create(
    model="smollm2-135m",
    messages=[{"role": "user", "content": "Say goodbye."}],
    temperature=0,
    max_tokens=12,
    stream=True,
):
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
embedding = client.embeddings.create(model="minilm-l6", input="My cat is called Miso.")
try:
    client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "x"}], max_tokens=10**9
    )
    error = None
except Exception as exc:  # the SDK's BadRequestError
    error = {"class": type(exc).__name__, "status": getattr(exc, "status_code", None)}
print(json.dumps({
    "models": models,
    "text": answer.choices[0].message.content,
    "usage": answer.usage.completion_tokens,
    "streamed": streamed,
    "finish": finish,
    "dims": len(embedding.data[0].embedding),
    "error": error,
}))
