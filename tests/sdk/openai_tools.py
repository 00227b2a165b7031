"""Drives a gateway's chat completions with the official `openai` Python SDK, tools included.

Usage: openai_tools.py BASE_URL API_KEY MODEL
Prints one JSON object: a plain reply, a streamed reply, and a tool call (plain and streamed).
"""
import json
import sys

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                       "required": ["location"]},
    },
}]


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello from the SDK"}]

    completion = client.chat.completions.create(model=model, messages=messages, max_tokens=50)
    streamed, usage_chunks, finish = [], 0, None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage_chunks += 1
        for choice in chunk.choices:
            if choice.delta.content:
                streamed.append(choice.delta.content)
            finish = choice.finish_reason or finish

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    tool = client.chat.completions.create(model=model, messages=ask, tools=TOOLS)
    call = tool.choices[0].message.tool_calls[0]
    # The streamed tool call, assembled from its fragments as an application would.
    parts = {}
    stream_finish = None
    for chunk in client.chat.completions.create(model=model, messages=ask, tools=TOOLS,
                                                stream=True):
        for choice in chunk.choices:
            stream_finish = choice.finish_reason or stream_finish
            for d in choice.delta.tool_calls or []:
                p = parts.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                p["id"] = d.id or p["id"]
                if d.function:
                    p["name"] = d.function.name or p["name"]
                    p["arguments"] += d.function.arguments or ""
    # The tool's answer goes back, and the model answers in text.
    follow = client.chat.completions.create(model=model, tools=TOOLS, messages=ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ])

    print(json.dumps({
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": completion.usage.model_dump(),
        "streamed": "".join(streamed),
        "stream_finish_reason": finish,
        "usage_chunks": usage_chunks,
        "tool_finish_reason": tool.choices[0].finish_reason,
        "tool_call": {"id": call.id, "name": call.function.name,
                      "arguments": json.loads(call.function.arguments)},
        "streamed_tool_calls": [
            {"id": p["id"], "name": p["name"], "arguments": json.loads(p["arguments"])}
            for _, p in sorted(parts.items())],
        "streamed_tool_finish_reason": stream_finish,
        "after_tool": follow.choices[0].message.content,
    }))


if __name__ == "__main__":
    main()
