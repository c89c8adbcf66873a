// The web page's files (src/server/web/), embedded in the binary at build time by
// embed_web.cmake: `kvlm serve` serves them at / and /web/NAME with no files on disk.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

namespace kvlm::server {

struct WebAsset {
  const char* name;          // the file's name in src/server/web: "index.html"
  const char* content_type;  // from its extension
  const unsigned char* data;
  size_t size;  // bytes
};

std::span<const WebAsset> web_assets();  // web_assets.cpp, generated

inline const WebAsset* find_web_asset(std::string_view name) {
  for (const WebAsset& a : web_assets())
    if (name == a.name) return &a;
  return nullptr;
}

}  // namespace kvlm::server
