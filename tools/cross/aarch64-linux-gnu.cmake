# Cross-compile for 64-bit Arm Linux with Debian's gcc-aarch64-linux-gnu; run the results with
# qemu-aarch64 (Debian's qemu-user): tools/qemu_tests.sh does both.
#   cmake -S . -B build-arm64 -DCMAKE_TOOLCHAIN_FILE=tools/cross/aarch64-linux-gnu.cmake -DPYMEM_BUILD_TESTS=ON
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# ctest runs the test programs through qemu with the target's loader and libraries
find_program(PYMEM_QEMU_AARCH64 qemu-aarch64)
if(PYMEM_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${PYMEM_QEMU_AARCH64};-L;/usr/aarch64-linux-gnu)
endif()
