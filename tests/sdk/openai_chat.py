"""Drives a gateway with the official `openai` Python SDK, as an application would.

Usage: openai_chat.py BASE_URL API_KEY MODEL
Prints one JSON object: the non-streamed reply and usage, and the streamed text.
"""
import json
import sys

from openai import OpenAI


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "Hello from the SDK"}]

    completion = client.chat.completions.create(model=model, messages=messages)
    streamed = []
    usage_chunks = 0
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage_chunks += 1
        for choice in chunk.choices:
            if choice.delta.content:
                streamed.append(choice.delta.content)
    models = [m.id for m in client.models.list()]

    print(json.dumps({
        "content": completion.choices[0].message.content,
        "total_tokens": completion.usage.total_tokens,
        "streamed": "".join(streamed),
        "usage_chunks": usage_chunks,
        "models": models,
    }))


if __name__ == "__main__":
    main()
