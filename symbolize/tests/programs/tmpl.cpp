// C++ with templates, lambdas, std containers and heavy inlining (test input).
#include <algorithm>
#include <map>
#include <string>
#include <vector>
#include <cstdio>

namespace shapes {
template <typename T> struct Acc {
    T total{};
    void add(const T &v) { total += v; }
};
template <typename T> T sum_sorted(std::vector<T> v) {
    std::sort(v.begin(), v.end(), [](const T &a, const T &b) { return b < a; });
    Acc<T> acc;
    for (const auto &x : v) acc.add(x);
    return acc.total;
}
}  // namespace shapes

int main(int argc, char **) {
    std::map<std::string, std::vector<int>> m;
    for (int i = 0; i < 1000 * argc; i++) m[std::to_string(i % 17)].push_back(i * 7 % 13);
    long t = 0;
    for (auto &kv : m) t += shapes::sum_sorted(kv.second);
    std::vector<double> d(100, 1.5);
    t += (long)shapes::sum_sorted(d);
    std::printf("%ld\n", t);
    return 0;
}
