// A model's reply from the fuzzer through the tool-call parser (server/tools.h), in every format
// of kToolCallFormats: parsed whole, and streamed in two pieces split where the first byte says.
// The two must agree (content and calls); nothing may throw: a reply that is not a call is text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "server/tools.h"

namespace {

// What a stream sent, gathered: the content deltas joined and each call's name and arguments.
kvlm::server::ParsedReply gather(const std::vector<kvlm::server::json>& deltas) {
  kvlm::server::ParsedReply out;
  for (const auto& d : deltas) {
    if (d.contains("content")) out.content += d["content"].get<std::string>();
    if (!d.contains("tool_calls")) continue;
    for (const auto& c : d["tool_calls"]) {
      const auto& f = c["function"];
      if (f.contains("name")) out.calls.push_back({"", f["name"].get<std::string>(), ""});
      if (f.contains("arguments") && !out.calls.empty())
        out.calls.back().arguments += f["arguments"].get<std::string>();
    }
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  const size_t split = std::min<size_t>(data[0], text.size());
  const std::vector<std::string> names = {"get_weather", "search"};
  for (const auto& f : kvlm::server::kToolCallFormats) {
    const auto whole = kvlm::server::parse_tool_calls(f, text, names);
    kvlm::server::ToolCallStream s(f, names);
    auto deltas = s.push(text.substr(0, split));
    for (auto& d : s.push(text.substr(split))) deltas.push_back(std::move(d));
    for (auto& d : s.finish()) deltas.push_back(std::move(d));
    const auto streamed = gather(deltas);
    if (streamed.content != whole.content || streamed.calls.size() != whole.calls.size())
      std::abort();  // the stream must say what the whole reply says
    for (size_t i = 0; i < whole.calls.size(); ++i)
      if (streamed.calls[i].name != whole.calls[i].name ||
          streamed.calls[i].arguments != whole.calls[i].arguments)
        std::abort();
  }
  return 0;
}
