"""The official OpenAI Python SDK against duet: structured output with a Pydantic model,
json_object, and tools with each tool_choice, streamed and not, and a tool result sent back.

usage: python structured.py BASE_URL MODEL  (prints "ok" at the end; any failure raises)
"""

import json
import sys

from openai import OpenAI
from pydantic import BaseModel, Field

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed")


class Person(BaseModel):
    # Bounded, as a schema for a small model should be: unbounded, a 0.5B model at
    # temperature 1 can repeat list items until max_tokens (valid JSON all the way, never done).
    name: str = Field(max_length=40)
    age: int
    languages: list[str] = Field(max_length=4)


for seed in range(1, 4):
    completion = client.beta.chat.completions.parse(
        model=model, seed=seed, temperature=1.0, max_tokens=150,
        messages=[{"role": "user", "content": "Invent a programmer and describe them."}],
        response_format=Person)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person), completion

answer = client.chat.completions.create(
    model=model, temperature=1.0, seed=4, max_tokens=150,
    messages=[{"role": "user", "content": "Describe a cat as JSON."}],
    response_format={"type": "json_object"})
if answer.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(answer.choices[0].message.content), dict), answer

tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]
question = [{"role": "user", "content": "What is the weather like in Paris right now?"}]

for choice in ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]:
    answer = client.chat.completions.create(model=model, messages=question, tools=tools,
                                            tool_choice=choice, temperature=0, max_tokens=80)
    message = answer.choices[0].message
    if choice == "auto" and not message.tool_calls:
        assert message.content, answer
        continue
    assert answer.choices[0].finish_reason == "tool_calls", answer
    call = message.tool_calls[0]
    assert call.function.name == "get_weather", answer
    assert isinstance(json.loads(call.function.arguments)["city"], str), answer

answer = client.chat.completions.create(model=model, messages=question, tools=tools,
                                        tool_choice="none", max_tokens=40)
assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content

# Streamed: the SDK's own accumulation of tool-call deltas.
with client.beta.chat.completions.stream(model=model, messages=question, tools=tools,
                                         tool_choice="required", temperature=0,
                                         max_tokens=80) as stream:
    for _ in stream:
        pass
    final = stream.get_final_completion()
call = final.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"], final

# The tool's result back, for the answer.
conversation = question + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
     "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
answer = client.chat.completions.create(model=model, messages=conversation, tools=tools,
                                        tool_choice="none", temperature=0, max_tokens=60)
assert answer.choices[0].message.content, answer

print("ok")
