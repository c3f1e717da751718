# Summarises a ctest JUnit report (ctest --output-junit): the test count, and
# every skipped test with the reason it gave (Google Test prints the GTEST_SKIP
# message after a "file:line: Skipped" line; see tests/capability.h).
# Usage: awk -v stage=NAME -f scripts/ctest_summary.awk REPORT.xml
# Skips whose reason carries tests/capability.h's waiver marker are counted
# apart. Prints "UNWAIVED_SKIPS <n>" on its last line, for scripts/test.sh.
function attr(line, key,    m) {
  if (match(line, key "=\"[^\"]*\"")) return substr(line, RSTART + length(key) + 2, RLENGTH - length(key) - 3)
  return ""
}
function unescape(s) {
  gsub(/&lt;/, "<", s); gsub(/&gt;/, ">", s); gsub(/&quot;/, "\"", s); gsub(/&apos;/, "'", s); gsub(/&amp;/, "\\&", s)
  return s
}
/<testcase / { name = unescape(attr($0, "name")); status = attr($0, "status"); reason = ""; note = ""; grab = 0; tests++ }
/<skipped / { note = unescape(attr($0, "message")) }
grab && /\[  SKIPPED \]/ { grab = 0 }
grab { reason = reason (reason == "" ? "" : " ") unescape($0) }
status == "notrun" && /: Skipped$/ { grab = 1 }
/<\/testcase>/ {
  if (status == "notrun") {
    skipped++
    why = reason != "" ? reason : note
    if (index(why, "(waived in CI by FAULTLINE_CI_WAIVE)")) waived++
    lines[skipped] = "  " name ": " why
  }
  else if (status == "fail") failed++
}
END {
  printf "== %s: %d tests, %d failed, %d skipped", stage, tests, failed, skipped
  if (waived) printf " (%d of them waived by FAULTLINE_CI_WAIVE)", waived
  print skipped ? ":" : ""
  for (i = 1; i <= skipped; i++) print lines[i]
  print "UNWAIVED_SKIPS " skipped - waived
}
