"""Drives a gateway's Messages endpoint with the official `anthropic` Python SDK, as an
application would: a plain message, a streamed one, a tool call (plain and streamed), the
tool's result sent back, a token count, and an error.

Usage: anthropic_messages.py BASE_URL API_KEY MODEL
Prints one JSON object with what the SDK returned.
"""
import json
import sys

import anthropic

TOOLS = [{
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                     "required": ["location"]},
}]


def main() -> None:
    base_url, api_key, model = sys.argv[1:4]
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "Hello from the SDK"}]

    message = client.messages.create(model=model, max_tokens=50, system="Be brief.",
                                     messages=messages)
    with client.messages.stream(model=model, max_tokens=50, messages=messages) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    tool = client.messages.create(model=model, max_tokens=100, tools=TOOLS, messages=ask)
    use = next((b for b in tool.content if b.type == "tool_use"), None)
    with client.messages.stream(model=model, max_tokens=100, tools=TOOLS,
                                messages=ask) as stream:
        streamed_tool = stream.get_final_message()
    streamed_use = next((b for b in streamed_tool.content if b.type == "tool_use"), None)
    follow = None
    if use is not None:
        follow = client.messages.create(model=model, max_tokens=100, tools=TOOLS, messages=ask + [
            {"role": "assistant", "content": [b.model_dump() for b in tool.content]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 21 C"}]},
        ])
    count = client.messages.count_tokens(model=model, messages=messages)

    error = None
    try:
        client.messages.create(model="no-such-model", max_tokens=10, messages=messages)
    except anthropic.APIStatusError as e:
        error = {"status": e.status_code, "type": e.body["error"]["type"]}

    print(json.dumps({
        "text": "".join(b.text for b in message.content if b.type == "text"),
        "stop_reason": message.stop_reason,
        "usage": message.usage.model_dump(),
        "streamed": streamed,
        "streamed_stop_reason": final.stop_reason,
        "streamed_usage": final.usage.model_dump(),
        "tool_stop_reason": tool.stop_reason,
        "tool_use": use and {"name": use.name, "input": use.input},
        "streamed_tool_use": streamed_use and {"name": streamed_use.name,
                                               "input": streamed_use.input},
        "after_tool": follow and "".join(b.text for b in follow.content if b.type == "text"),
        "count_tokens": count.input_tokens,
        "error": error,
    }))


if __name__ == "__main__":
    main()
