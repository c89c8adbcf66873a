// JSON schema -> grammar (grammar.h), for OpenAI's response_format.
//
// The subset schemas written for structured output use: type (object, array, string, number,
// integer, boolean, null, or a list of them), properties, required, additionalProperties, items,
// minItems, maxItems, enum, const, anyOf, $ref to $defs/definitions (recursion included), and
// the annotations (title, description, default, examples, $schema, $id, $comment), which are
// ignored. Any other keyword is refused, naming it.
//
// What the grammar produces always validates against the schema; it is narrower than the schema
// where that keeps it simple: properties come in the schema's order (an ordered_json keeps the
// order they were written in, as OpenAI's strict mode writes them), none beyond `properties`
// (whatever additionalProperties says), required ones always, optional ones may be left out;
// numbers have at most 16 integer and 16 fraction digits; whitespace between tokens is at most
// kJsonMaxWhitespace bytes of space, tab, newline, carriage return. Strings hold any byte but
// the quote, the backslash, control bytes and bytes that never occur in UTF-8 (0xC0, 0xC1,
// 0xF5-0xFF), plus JSON's escapes; multi-byte sequences are not checked further.
#pragma once

#include <memory>
#include <string_view>
#include <nlohmann/json_fwd.hpp>

#include "grammar/grammar.h"

namespace kvlm {

inline constexpr uint16_t kJsonMaxWhitespace = 16;  // bytes between two tokens of JSON
inline constexpr int kJsonSchemaMaxDepth = 32;      // nested schemas (not counting $ref)
inline constexpr int64_t kJsonSchemaMaxItems = 1024;     // bound on minItems / maxItems
inline constexpr size_t kJsonSchemaMaxProperties = 256;  // per object
inline constexpr size_t kJsonSchemaMaxAnyOf = 64;        // schemas in one anyOf
inline constexpr size_t kJsonSchemaMaxLiteral = 1024;    // bytes of one enum / const value

// Throws kvlm::Error naming the keyword and where it is ("at /properties/age") for what is not
// supported or not a valid schema.
std::shared_ptr<const Grammar> compile_json_schema(const nlohmann::ordered_json& schema);
// The schema's value with fixed text around it (a tool call's markers: "<tool_call>\n" ... "\n
// </tool_call>").
std::shared_ptr<const Grammar> compile_json_schema(const nlohmann::ordered_json& schema,
                                                   std::string_view prefix,
                                                   std::string_view suffix);
// Any JSON object (response_format json_object).
std::shared_ptr<const Grammar> json_object_grammar();

}  // namespace kvlm
