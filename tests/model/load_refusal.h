// Files the loader must refuse, shared by the load tests of tests/model.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "base/error.h"
#include "model/model.h"
#include "test_util.h"

namespace kvlm::test {

// Each (file in tests/data, needle): Model::load refuses the file with one line holding needle.
template <size_t N>
void expect_loads_refused(const std::pair<const char*, const char*> (&cases)[N]) {
  for (const auto& [file, needle] : cases) {
    try {
      Model::load(data_path(file));
      ADD_FAILURE() << file << " loaded";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
}

}  // namespace kvlm::test
