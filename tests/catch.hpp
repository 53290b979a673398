// Catch2 2.x (Debian 12) and 3.x (Ubuntu 24.04) behind one include.
#pragma once
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#define PI0_CATCH3 1
#else
#include <catch2/catch.hpp>
#endif
